-- wrk script of benchmarks/latency.py: POST bodies built from a template and a rotating list of texts.
--
--   wrk -t1 -c8 -d20s -s benchmarks/rotate.lua URL -- <spec.json-lines file> <max requests> <offset>
--
-- The spec file: line 1 is the request path, line 2 the body template with the markers @Q@ (replaced by
-- a text, already JSON-encoded with its quotes) and @N@ (replaced by a per-request counter, unique
-- across threads: used as the `seed` field so that every body differs and the exact tier never answers);
-- every further line is one JSON-encoded text. Each thread walks the texts from its own offset.
-- The run stops after <max requests> responses per thread (bounded load) or at -d, whichever is first.
-- done() prints one JSON line: latency percentiles (µs), request and error counts, and the x-velo-action
-- header counts (what the proxy did).

local threads = {}
local counter = 0
local texts = {}
local path = "/"
local pre, mid, post = "", "", ""
local q_first = true
local max_requests = 0
local responses = 0
n_A, n_B, n_C, n_exact, n_none, n_non200 = 0, 0, 0, 0, 0, 0

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

local function split_template(t)
  local qs, qe = string.find(t, "@Q@", 1, true)
  local ns, ne = string.find(t, "@N@", 1, true)
  if ns == nil then
    return string.sub(t, 1, qs - 1), string.sub(t, qe + 1), nil, true
  end
  if qs < ns then
    return string.sub(t, 1, qs - 1), string.sub(t, qe + 1, ns - 1), string.sub(t, ne + 1), true
  end
  return string.sub(t, 1, ns - 1), string.sub(t, ne + 1, qs - 1), string.sub(t, qe + 1), false
end

function init(args)
  local spec = args[1]
  max_requests = tonumber(args[2] or "0") or 0
  local offset = tonumber(args[3] or "0") or 0
  local i = 0
  local template = nil
  for line in io.lines(spec) do
    i = i + 1
    if i == 1 then
      path = line
    elseif i == 2 then
      template = line
    else
      table.insert(texts, line)
    end
  end
  pre, mid, post, q_first = split_template(template)
  counter = offset + (thread_index or 0) * 10000000
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local q = texts[(counter % #texts) + 1]
  local body
  if post == nil then
    body = pre .. q .. mid
  elseif q_first then
    body = pre .. q .. mid .. tostring(counter) .. post
  else
    body = pre .. tostring(counter) .. mid .. q .. post
  end
  return wrk.format("POST", path, nil, body)
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 then
    n_non200 = n_non200 + 1
  end
  local a = headers["x-velo-action"] or headers["X-Velo-Action"]
  if a == "A" then n_A = n_A + 1
  elseif a == "B" then n_B = n_B + 1
  elseif a == "C" then n_C = n_C + 1
  elseif a == "exact" then n_exact = n_exact + 1
  else n_none = n_none + 1 end
  if max_requests > 0 and responses >= max_requests then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local acts = {A = 0, B = 0, C = 0, exact = 0, none = 0, non200 = 0}
  for _, t in ipairs(threads) do
    acts.A = acts.A + (t:get("n_A") or 0)
    acts.B = acts.B + (t:get("n_B") or 0)
    acts.C = acts.C + (t:get("n_C") or 0)
    acts.exact = acts.exact + (t:get("n_exact") or 0)
    acts.none = acts.none + (t:get("n_none") or 0)
    acts.non200 = acts.non200 + (t:get("n_non200") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    '\nWRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"min": %d, "mean": %.1f, "p50": %d, "p90": %d, "p95": %d, "p99": %d, "max": %d}, ' ..
    '"actions": {"A": %d, "B": %d, "C": %d, "exact": %d, "none": %d, "non200": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency.max,
    acts.A, acts.B, acts.C, acts.exact, acts.none, acts.non200))
end
