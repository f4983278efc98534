-- The end of every wrk run of the benchmark: one line "bench-report {json}" with the
-- counts, errors and latency percentiles (microseconds), for bench/wrk_runner.py to read.

function done(summary, latency, requests)
  local percentiles = {}
  for _, p in ipairs({50, 75, 90, 99, 99.9}) do
    table.insert(percentiles, string.format('"%s": %d', tostring(p), latency:percentile(p)))
  end
  local errors = summary.errors
  io.write(string.format(
    'bench-report {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "max": %d, %s}}\n',
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency.mean, latency.max, table.concat(percentiles, ", ")))
end
