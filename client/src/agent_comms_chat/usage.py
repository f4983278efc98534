"""agent-chat's usage text, read: its commands, their options, the options' values and
which options exclude each other; and why a command line does not match it, said in one
line. Read from the usage text itself, so neither plainline.py's reading nor the
explanation can drift from what docopt accepts. What every command line reads is read
with string methods (a regular expression is compiled on its first use, a millisecond or
more of a short command's time); the explanation's expressions only for a mistake."""

import re

# "[--since TIMESTAMP | --after ID]": options of which a command takes at most one.
_ALTERNATIVES = r"\[([^\[\]]*\|[^\[\]]*)\]"
# "[--tag T]...": an option a command takes again and again.
_REPEATABLE = r"\[(--?[\w-]+)[^\[\]]*\]\.\.\."
_BRACKETED = r"\[[^\[\]]*\]|\([^()]*\)"
# Brackets, parentheses and bars, as spaces: the words of a usage line.
_GROUPING = str.maketrans("[]()|", "     ")


def words_of(pattern):
    """The words of a usage line or part of one, its groupings left out."""
    return pattern.translate(_GROUPING).split()


def _is_command(word):
    return word.isascii() and word.isalpha() and word.islower()


class Usage:
    def __init__(self, doc, program="agent-chat"):
        self.program = program
        self.patterns = {}  # command: its usage line, continuation lines joined
        self.takes_value = {}  # option: whether it takes a value
        self.defaults = {}  # option: its [default: ...], if it has one
        self.synonyms = {}  # option: the name docopt gives its value (-h: --help)
        self._read_patterns(doc)
        self._read_options(doc)
        mentioned = {word for pattern in self.patterns.values() for word in self.options_in(pattern)}
        # docopt's [options]: every option no usage line names, allowed with any command.
        self.common = {option for option in self.takes_value if option not in mentioned}

    def _read_patterns(self, doc):
        section = doc.split("Usage:", 1)[1].split("\n\n", 1)[0]
        command = None  # the command of the line being read
        for line in section.splitlines():
            line = line.strip()
            if line.startswith(self.program + " "):
                words = [word for word in line.split()[1:] if word != "[options]"]
                command = words[0] if words and _is_command(words[0]) else None
                if command:
                    self.patterns[command] = line
            elif command and line:
                self.patterns[command] += " " + line

    def _read_options(self, doc):
        section = doc.split("Options:", 1)[1]
        names = []  # the option being described and its synonyms (-h --help)
        for line in section.splitlines():
            if line and not line[0].isspace():
                break  # the next section
            text = line.strip()
            if text.startswith("-"):
                described, _, text = text.partition("  ")
                words = described.replace(",", " ").replace("=", " ").split()
                names = [word for word in words if word.startswith("-")]
                for name in names:
                    self.takes_value[name] = any(not word.startswith("-") for word in words)
                    self.synonyms[name] = names[-1]
            # As docopt reads it: [default: ...] in any case, its value up to the line's last ].
            start = text.lower().find("[default: ")
            if start >= 0 and names and "]" in text[start:]:
                self.defaults[names[-1]] = text[start + len("[default: ") : text.rindex("]")]

    @staticmethod
    def options_in(pattern):
        words = [word.removesuffix("...") for word in words_of(pattern)]
        return [word for word in words if word[:1] == "-" and word.lstrip("-")[:1].islower()]

    def _complete(self, name):
        """An option's full name from a unique prefix, as docopt accepts it; (name, None)
        or (None, why not)."""
        if name in self.takes_value:
            return name, None
        started = sorted(option for option in self.takes_value if option.startswith(name) and name.startswith("--"))
        if len(started) == 1:
            return started[0], None
        if started:
            return None, f"{name} is ambiguous: it could be {', '.join(started)}"
        import difflib

        close = difflib.get_close_matches(name, list(self.takes_value), n=1)
        return None, f"unknown option {name}" + (f" (did you mean {close[0]}?)" if close else "")

    def explain(self, argv):
        """One line on why `argv` matches none of the usage lines."""
        words, used = [], []
        tokens = list(argv)
        index = 0
        while index < len(tokens):
            token = tokens[index]
            index += 1
            if token == "--":
                words += tokens[index:]
                break
            if not token.startswith("-") or token == "-":
                words.append(token)
                continue
            name, has_value, _ = token.partition("=")
            option, problem = self._complete(name)
            if problem:
                return problem
            if self.takes_value[option] and not has_value:
                if index == len(tokens):
                    return f"{option} needs a value"
                index += 1
            elif has_value and not self.takes_value[option]:
                return f"{option} takes no value"
            used.append(option)
        commands = ", ".join(self.patterns)
        if not words:
            return f"no command given: the commands are {commands} ({self.program} --help)"
        command = words[0]
        if command not in self.patterns:
            return f"unknown command {command!r}: the commands are {commands} ({self.program} --help)"
        return f"{self._mismatch(command, words[1:], used)}; usage: {self.patterns[command]}"

    def _mismatch(self, command, arguments, used):
        pattern = self.patterns[command]
        own = set(self.options_in(pattern))
        for option in used:
            if option not in own and option not in self.common:
                others = [name for name, line in self.patterns.items() if option in self.options_in(line)]
                where = f" (it is an option of {', '.join(others)})" if others else ""
                return f"{option} is not an option of {command}{where}"
        for group in re.findall(_ALTERNATIVES, pattern):
            given = [option for option in self.options_in(group) if option in used]
            if len(given) > 1:
                return f"{' and '.join(given)} exclude each other: give one of them"
        repeatable = set(re.findall(_REPEATABLE, pattern))
        for option in used:
            if used.count(option) > 1 and option not in repeatable:
                return f"{option} is given twice"
        expected = [word for word in re.sub(_BRACKETED, " ", pattern).split() if word.isupper()]
        if len(arguments) < len(expected):
            return f"{command} needs {' '.join(expected[len(arguments) :])}"
        if len(arguments) > len(expected):
            takes = " ".join(expected) or "no arguments"
            return f"{command} takes {takes}: {arguments[len(expected)]!r} is one too many (quote a text with spaces)"
        return "that does not match the usage"
