-- wrk script shared by the benchmarks: GETs the narinfo of each hash in
-- $HASHES_FILE in turn, and prints one RESULT line (requests, bytes,
-- duration in µs, then connect, read, write, status and timeout errors).
local paths = {}
for h in io.lines(os.getenv("HASHES_FILE")) do paths[#paths + 1] = "/" .. h .. ".narinfo" end
local i = 0
request = function()
	i = i + 1
	return wrk.format("GET", paths[(i % #paths) + 1])
end
done = function(s, latency, requests)
	local e = s.errors
	io.write(string.format("RESULT %d %d %d %d %d %d %d %d\n", s.requests, s.bytes, s.duration,
		e.connect, e.read, e.write, e.status, e.timeout))
end
