"""The command lines agents run most (send CHANNEL MESSAGE, read CHANNEL, status...), read
from the usage text as docopt reads them, without docopt: a short command is a process of
its own, and importing docopt and having it read the usage took longer than everything
else `agent-chat send` does (some 25 ms of 70, on a slow day of the benchmark machine).

Only plain command lines are read here. The command's usage line must be its required
arguments and options that each stand alone ([--limit N], [--unread], [--tag T]...); the
command line may give those options and the common ones ([options]), each once but for
the repeatable ones, a value with its option (--limit 5 or --limit=5), the arguments in
their order. For anything else (--help, a short or shortened option, an option nested in
another or among alternatives, --, a value that starts with "-") `read` returns None and
docopt reads the command line."""

from .usage import Usage, words_of

# docopt's own options: left to it.
_DOCOPT_OWN = ("--help", "--version")


def _alone(item):
    """(option, repeatable) for an option standing alone in a usage line, "[--limit N]",
    "[--unread]", "[--tag T]..."; else None."""
    group = item.removesuffix("...")
    words = group[1:-1].split()
    if group[:1] != "[" or group[-1:] != "]" or not 1 <= len(words) <= 2 or not words[0].startswith("--"):
        return None
    if any(char in word for word in words for char in "[]()|") or (len(words) == 2 and not words[1].isupper()):
        return None
    return words[0], item.endswith("...")


def _items(pattern):
    """A usage line's words and bracketed groups, outermost only: "[--tag T]...",
    "[--wait-reply [--timeout SECONDS]]", "(init [--force] | publish)"."""
    items, depth, start = [], 0, None
    for index, char in enumerate(pattern + " "):
        if char == " " and depth == 0:
            if start is not None:
                items.append(pattern[start:index])
                start = None
            continue
        if start is None:
            start = index
        depth += (char in "[(") - (char in "])")
    return items


class PlainLines:
    def __init__(self, doc, program="agent-chat"):
        self.usage = usage = Usage(doc, program)
        # Each line's items, with what _alone makes of each: read once, used twice below.
        lines = {
            command: [(item, _alone(item)) for item in _items(pattern)] for command, pattern in usage.patterns.items()
        }
        # Options docopt gives a list (or a count) in every reading: repeatable ("[--tag T]...")
        # or named twice in a usage line.
        self.repeatable = set()
        for command, pattern in usage.patterns.items():
            named = usage.options_in(pattern)
            self.repeatable.update(alone[0] for _, alone in lines[command] if alone and alone[1])
            self.repeatable.update(option for option in named if named.count(option) > 1)
        self.empty = self._empty()
        # command: (its arguments in order, {option standing alone in its line: repeatable})
        self.plain = {}
        for command, items in lines.items():
            plain = self._plain(program, command, items)
            if plain is not None:
                self.plain[command] = plain

    def _empty(self):
        """What docopt gives for every option, argument and command not on the command
        line: the option's default, None, False, or [] for what may be repeated."""
        usage = self.usage
        empty = {}
        for option, takes_value in usage.takes_value.items():
            name = usage.synonyms[option]
            default = usage.defaults.get(name)
            if takes_value:
                empty[name] = (default.split() if default else []) if name in self.repeatable else default
            else:
                empty[name] = 0 if name in self.repeatable else False
        for pattern in usage.patterns.values():
            words = words_of(pattern.replace("[options]", ""))[1:]
            for before, word in zip(["", *words], words):
                if word == "--":
                    empty[word] = False
                elif word.startswith("-") or word == "...":
                    continue
                elif word.rstrip(".").isupper():
                    if not usage.takes_value.get(before):  # else the value of the option before it
                        empty[word.rstrip(".")] = [] if word.endswith("...") else None
                else:
                    empty[word] = False
        return empty

    @staticmethod
    def _plain(program, command, items):
        """(arguments, options standing alone) of a plain usage line, given as its items and
        what _alone made of each; None for another line."""
        if [item for item, _ in items[:3]] != [program, "[options]", command]:
            return None
        arguments, alone = [], {}
        for item, option in items[3:]:
            if option and option[0] in alone:
                return None  # an option named twice in a line: docopt counts it
            if option:
                alone[option[0]] = option[1]
            elif item.startswith("[") and any(word.startswith("-") for word in words_of(item)):
                continue  # options nested or among alternatives: a command line with them is docopt's
            elif item.isupper() and item.isidentifier():
                arguments.append(item)
            else:
                return None  # an optional or repeated argument, a group of commands, --
        return arguments, alone

    def read(self, argv):
        """docopt's reading of `argv`, if it is a plain command line; else None."""
        usage = self.usage
        words, given = [], {}
        index = 0
        while index < len(argv):
            token = argv[index]
            index += 1
            if not token.startswith("-") or token == "-":
                words.append(token)
                continue
            option, has_value, value = token.partition("=")
            if option not in usage.takes_value or not option.startswith("--") or option in _DOCOPT_OWN:
                return None
            if not usage.takes_value[option]:
                if has_value:
                    return None
                value = True
            elif not has_value:
                if index == len(argv) or argv[index].startswith("-"):
                    return None
                value = argv[index]
                index += 1
            given.setdefault(option, []).append(value)
        if not words or words[0] not in self.plain:
            return None
        command = words[0]
        arguments, alone = self.plain[command]
        if len(words) - 1 != len(arguments):
            return None
        # (Lists copied: the empty reading's are shared by every reading.)
        args = {key: list(value) if isinstance(value, list) else value for key, value in self.empty.items()}
        args[command] = True
        args.update(zip(arguments, words[1:]))
        for option, values in given.items():
            if option not in alone and option not in usage.common:
                return None
            if len(values) > 1 and not alone.get(option):
                return None  # given again, where this line does not let it repeat
            if option in self.repeatable:  # docopt's value is a list (a count) in every line
                args[option] = values if usage.takes_value[option] else len(values)
            else:
                args[option] = values[0]
        return args
