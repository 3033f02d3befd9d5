"""Every Lua script of the Redis queue backend, by name, and the key layout (docs/redis.md lists
each script with its complexity). ``queue.py`` holds the Python around them.

Keys: every key of one arqd deployment starts with the hash tag ``{<prefix>}`` (``P`` below), so
all of them live in one slot and a script may touch any of them on Redis Cluster. ``KEYS[1]`` of
every script is ``P`` itself (a key name of that slot: Cluster clients route by it) and the
script builds the other names from it:

- ``P:j:<id>``       hash, one job: each field a field of the record as JSON text (absent when
  ``None``), plus ``_t`` (the lease token) and ``_f`` (the fingerprint of the last outcome);
- ``P:q:<queue>``    sorted set, the queue's queued and running jobs by visible time (run-at or
  lease deadline), ties by id; an expired lease is simply visible again;
- ``P:k:<key>``      hash, a held dedupe key: ``j`` the job, ``x`` when it stops being held;
- ``P:g:<group>``    string, a group's record (JSON);
- ``P:n``            hash, job counts by ``<state>:<queue>``;
- ``P:x``            sorted set, expiring terminal jobs by ``expires_at``, each named
  ``<id>\\t<state>\\t<queue>`` (a sweep that finds the record gone still knows its count);
- ``P:r:0``, ``P:r:1`` sorted sets, succeeded jobs with a result to drop (temporary, sticky), by
  finish time;
- ``P:l``, ``P:l:q:<queue>``, ``P:l:o:<owner>``, ``P:l:g:<group>``, ``P:l:<state>``,
  ``P:l:<state>:<queue>`` (failed, cancelled): listing indexes, sorted sets of ids (score 0,
  by id, so newest last);
- ``P:w`` hash and ``P:ws`` sorted set: the worker registry; ``P:m`` hash: the marks;
- channels ``P:ready:<queue>`` (a job of that queue is ready now) and ``P:done`` (ids of jobs
  that ended, joined by commas).

Names inside a key are JSON text (a queue's without its quotes), exactly as the record holds
them, so Python and Lua build the same names without escaping rules of their own.

Times travel as the decimal text Python wrote (``repr``) and are stored as such: Lua compares
them with ``tonumber`` (a double, exact) but never formats one (``tostring`` keeps 14 digits).
A script never fails half-way: the Python side converts and checks every value first, and
``#!lua`` makes Redis refuse a writing script at its start when it is out of memory.
"""

from __future__ import annotations

import msgspec

# Shared by every script: key names and small helpers.
_PRELUDE = r"""
local P = KEYS[1]
local function jk(id) return P .. ':j:' .. id end
local function qk(qn) return P .. ':q:' .. qn end
local function unq(text) return string.sub(text, 2, -2) end
local function record(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local function add(deltas, field, n) deltas[field] = (deltas[field] or 0) + n end
local function flush(deltas)
  for field, n in pairs(deltas) do
    if n ~= 0 then redis.call('HINCRBY', P .. ':n', field, n) end
  end
end
local function expiring(id, st, qn) return id .. '\t' .. st .. '\t' .. qn end
-- The job holding a key (its id), or false: held while its job exists and x has not passed.
local function holder(keytext, now)
  local v = redis.call('HMGET', P .. ':k:' .. keytext, 'j', 'x')
  if not v[1] then return false end
  if v[2] and tonumber(v[2]) <= now then return false end
  if redis.call('EXISTS', jk(v[1])) == 0 then return false end
  return v[1]
end
local function take_key(keytext, id)
  local kk = P .. ':k:' .. keytext
  redis.call('DEL', kk)
  redis.call('HSET', kk, 'j', id)
end
local function free_key(keytext, id)
  local kk = P .. ':k:' .. keytext
  if redis.call('HGET', kk, 'j') == id then redis.call('DEL', kk) end
end
-- Delete a terminal job (record f) with every index entry, its count and its key.
local function forget(id, f)
  local qn, st = unq(f.queue), unq(f.state)
  redis.call('DEL', jk(id))
  redis.call('ZREM', P .. ':l', id)
  redis.call('ZREM', P .. ':l:q:' .. qn, id)
  if f.owner then redis.call('ZREM', P .. ':l:o:' .. f.owner, id) end
  if f.group_id then redis.call('ZREM', P .. ':l:g:' .. f.group_id, id) end
  if st == 'failed' or st == 'cancelled' then
    redis.call('ZREM', P .. ':l:' .. st, id)
    redis.call('ZREM', P .. ':l:' .. st .. ':' .. qn, id)
  end
  if f.expires_at then redis.call('ZREM', P .. ':x', expiring(id, st, qn)) end
  redis.call('ZREM', P .. ':r:' .. (f.sticky == 'true' and '1' or '0'), id)
  redis.call('HINCRBY', P .. ':n', st .. ':' .. qn, -1)
  if f.key then free_key(f.key, id) end
end
"""


def _script(body: str, *, writes: bool = True, frees: bool = False) -> str:
    """A script with its flags: ``no-writes`` for a read; ``allow-oom`` for one that frees
    memory or only rescores what exists (sweep, delete, heartbeat, listing's tidying): a server
    out of memory refuses every other writing script, and refusing these kept it full until
    the key TTLs fired and let every running lease expire."""
    flags = "#!lua flags=no-writes" if not writes else "#!lua flags=allow-oom" if frees else "#!lua"
    return f"{flags}\n{_PRELUDE}\n{body.strip()}\n"


# --- submit -----------------------------------------------------------------------------------

# ARGV: now, group id ('' none), the group record's head ('' none), then the jobs as one
# MessagePack array (an argument per value cost more to send than the script costs to run): per
# job id, queue name, ready_at, key ('' none), owner ('' none), group ('' none), the member's head
# in the group record ('' none), and its hash fields (field, value…). Answers per job 1 (stored)
# or the holder's record (its key was held). O(fields + log N) per job.
ENQUEUE = _script(
    r"""
local now = tonumber(ARGV[1])
local gid, ghead = ARGV[2], ARGV[3]
local jobs = cmsgpack.unpack(ARGV[4])
local out, members, counts, ready = {}, {}, {}, {}
for j, row in ipairs(jobs) do
  local id, qn, at, key, owner, grp, mhead = row[1], row[2], row[3], row[4], row[5], row[6], row[7]
  local held = false
  if key ~= '' then held = holder(key, now) end
  if held then
    out[j] = redis.call('HGETALL', jk(held))
    members[j] = mhead .. held .. '"}'
  else
    redis.call('HSET', jk(id), unpack(row[8]))
    redis.call('ZADD', qk(qn), at, id)
    redis.call('ZADD', P .. ':l', 0, id)
    redis.call('ZADD', P .. ':l:q:' .. qn, 0, id)
    if owner ~= '' then redis.call('ZADD', P .. ':l:o:' .. owner, 0, id) end
    if grp ~= '' then redis.call('ZADD', P .. ':l:g:' .. grp, 0, id) end
    if key ~= '' then take_key(key, id) end
    add(counts, 'queued:' .. qn, 1)
    if tonumber(at) <= now then ready[qn] = true end
    out[j] = 1
    members[j] = mhead .. id .. '"}'
  end
end
if gid ~= '' then
  redis.call('SET', P .. ':g:' .. gid, ghead .. table.concat(members, ',') .. ']}')
end
flush(counts)
for qn in pairs(ready) do redis.call('PUBLISH', P .. ':ready:' .. qn, '') end
return out
"""
)

# --- leasing ----------------------------------------------------------------------------------

# ARGV: now, limit, token, lease deadline, then the queues' names in order. Each queue's visible
# entries from the lowest score: a queued job, or a running one whose lease expired (answered
# as recovered). Answers pairs (recovered 0/1, record). O(log N + k) per queue for k leased.
LEASE = _script(
    r"""
local now, limit, token, deadline = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local out, counts = {}, {}
local taken = 0
for a = 5, #ARGV do
  if taken >= limit then break end
  local qn = ARGV[a]
  local ids = redis.call('ZRANGEBYSCORE', qk(qn), '-inf', now, 'LIMIT', 0, limit - taken)
  for _, id in ipairs(ids) do
    local v = redis.call('HMGET', jk(id), 'state', 'attempts', 'version')
    if v[1] == '"queued"' or v[1] == '"running"' then
      redis.call('HSET', jk(id), 'state', '"running"', 'attempts', tonumber(v[2]) + 1,
        'version', tonumber(v[3]) + 1, 'started_at', now, '_t', token)
      redis.call('ZADD', qk(qn), deadline, id)
      if v[1] == '"queued"' then
        add(counts, 'queued:' .. qn, -1)
        add(counts, 'running:' .. qn, 1)
      end
      taken = taken + 1
      out[#out + 1] = v[1] == '"running"' and 1 or 0
      out[#out + 1] = redis.call('HGETALL', jk(id))
    else
      redis.call('ZREM', qk(qn), id)  -- a stray entry: its job ended or went
    end
  end
end
flush(counts)
return out
"""
)

# The jobs a lease call whose answer was lost took, still held under its token. ARGV: the lease's
# deadline (its score in each queue's set, as LEASE wrote it), its token, then the queues. Answers
# their records (at most 1,000 a queue: a lease takes at most workers.batch). O(log N + k) per
# queue.
LEASE_AGAIN = _script(
    r"""
local deadline, token = ARGV[1], ARGV[2]
local out = {}
for a = 3, #ARGV do
  local ids = redis.call('ZRANGEBYSCORE', qk(ARGV[a]), deadline, deadline, 'LIMIT', 0, 1000)
  for _, id in ipairs(ids) do
    local v = redis.call('HMGET', jk(id), 'state', '_t')
    if v[1] == '"running"' and v[2] == token then
      out[#out + 1] = redis.call('HGETALL', jk(id))
    end
  end
end
return out
""",
    writes=False,
)

# ARGV: the new deadline, then (id, token) pairs. Answers (held 0/1, cancel requested 0/1) per
# pair. O(log N) each.
HEARTBEAT = _script(
    r"""
local deadline = ARGV[1]
local out = {}
for a = 2, #ARGV, 2 do
  local id, token = ARGV[a], ARGV[a + 1]
  local v = redis.call('HMGET', jk(id), 'state', '_t', 'queue', 'cancel_requested')
  if v[1] == '"running"' and v[2] == token then
    redis.call('ZADD', qk(unq(v[3])), deadline, id)
    out[#out + 1] = 1
    out[#out + 1] = v[4] == 'true' and 1 or 0
  else
    out[#out + 1] = 0
    out[#out + 1] = 0
  end
end
return out
""",
    frees=True,
)

# ARGV: per update id, token, progress, steps, checkpoint ('' leaves a field). Answers 1/0 per
# update. O(fields) each.
UPDATE = _script(
    r"""
local out = {}
for a = 1, #ARGV, 5 do
  local id, token = ARGV[a], ARGV[a + 1]
  local v = redis.call('HMGET', jk(id), 'state', '_t')
  if v[1] == '"running"' and v[2] == token then
    local set = {}
    if ARGV[a + 2] ~= '' then set[#set + 1] = 'progress'; set[#set + 1] = ARGV[a + 2] end
    if ARGV[a + 3] ~= '' then
      set[#set + 1] = 'steps'; set[#set + 1] = ARGV[a + 3]
      set[#set + 1] = 'checkpoint'; set[#set + 1] = ARGV[a + 4]
    end
    redis.call('HSET', jk(id), unpack(set))
    redis.call('HINCRBY', jk(id), 'version', 1)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""
)

# ARGV: now, then the outcomes as one MessagePack array, each of 14 values: id, token, state,
# attempts given back (0/1), started_at, result, error, expires_at, ready_at, free key (0/1),
# keep key (0/1), the TTL of an expiring record (seconds), the drop index ('0'/'1': a result a
# purge may drop; '' none), the fingerprint (token:digest); '' is "none". An outcome whose token
# no longer holds the job answers 1 if the job's fingerprint is its own (its first try landed,
# the answer was lost), else 0. O(log N) each.
FINISH = _script(
    r"""
local now = ARGV[1]
local nowf = tonumber(now)
local out, counts, ended, ready = {}, {}, {}, {}
for _, o in ipairs(cmsgpack.unpack(ARGV[2])) do
  local id, token, st, give = o[1], o[2], o[3], tonumber(o[4])
  local started, result, err, exp = o[5], o[6], o[7], o[8]
  local at, free, keep, ttl = o[9], o[10], o[11], o[12]
  local drop, fp = o[13], o[14]
  local key = jk(id)
  local v = redis.call('HMGET', key, 'state', '_t', 'queue', 'attempts', 'version', 'key', '_f')
  if v[1] == '"running"' and v[2] == token then
    local qn = unq(v[3])
    local set = {'state', '"' .. st .. '"', 'attempts', tonumber(v[4]) - give,
      'version', tonumber(v[5]) + 1, '_f', fp}
    local unset = {'_t'}
    if started ~= '' then
      set[#set + 1] = 'started_at'; set[#set + 1] = started
    else
      unset[#unset + 1] = 'started_at'
    end
    add(counts, 'running:' .. qn, -1)
    add(counts, st .. ':' .. qn, 1)
    if st == 'queued' then
      set[#set + 1] = 'ready_at'; set[#set + 1] = at
      if err ~= '' then set[#set + 1] = 'error'; set[#set + 1] = err end
      redis.call('ZADD', qk(qn), at, id)
      if tonumber(at) <= nowf then ready[qn] = true end
    else
      set[#set + 1] = 'finished_at'; set[#set + 1] = now
      for _, f in ipairs({{'result', result}, {'error', err}, {'expires_at', exp}}) do
        if f[2] ~= '' then
          set[#set + 1] = f[1]; set[#set + 1] = f[2]
        else
          unset[#unset + 1] = f[1]
        end
      end
      redis.call('ZREM', qk(qn), id)
      if exp ~= '' then
        redis.call('ZADD', P .. ':x', exp, expiring(id, st, qn))
        redis.call('EXPIRE', key, ttl)
      end
      if st == 'failed' or st == 'cancelled' then
        redis.call('ZADD', P .. ':l:' .. st, 0, id)
        redis.call('ZADD', P .. ':l:' .. st .. ':' .. qn, 0, id)
      end
      if drop ~= '' then redis.call('ZADD', P .. ':r:' .. drop, now, id) end
      if v[6] then
        local kk = P .. ':k:' .. v[6]
        if redis.call('HGET', kk, 'j') == id then
          if free == '1' then
            redis.call('DEL', kk)
          elseif keep == '1' then
            redis.call('HDEL', kk, 'x')
            if exp ~= '' then redis.call('EXPIRE', kk, ttl) end
          elseif exp ~= '' then
            redis.call('HSET', kk, 'x', exp)
            redis.call('EXPIRE', kk, ttl)
          end
        end
      end
      ended[#ended + 1] = id
    end
    redis.call('HDEL', key, unpack(unset))
    redis.call('HSET', key, unpack(set))
    out[#out + 1] = 1
  elseif v[7] == fp then
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
flush(counts)
for qn in pairs(ready) do redis.call('PUBLISH', P .. ':ready:' .. qn, '') end
if #ended > 0 then redis.call('PUBLISH', P .. ':done', table.concat(ended, ',')) end
return out
"""
)

# --- single jobs ------------------------------------------------------------------------------

# ARGV: id, free the key (0/1), now. Answers the record after, or nil. O(log N).
CANCEL = _script(
    r"""
local id, free, now = ARGV[1], ARGV[2], ARGV[3]
local key = jk(id)
local v = redis.call('HMGET', key, 'state', 'queue', 'key', 'cancel_requested')
if not v[1] then return false end
if v[1] == '"queued"' then
  local qn = unq(v[2])
  redis.call('HSET', key, 'state', '"cancelled"', 'finished_at', now)
  redis.call('HINCRBY', key, 'version', 1)
  redis.call('ZREM', qk(qn), id)
  redis.call('ZADD', P .. ':l:cancelled', 0, id)
  redis.call('ZADD', P .. ':l:cancelled:' .. qn, 0, id)
  redis.call('HINCRBY', P .. ':n', 'queued:' .. qn, -1)
  redis.call('HINCRBY', P .. ':n', 'cancelled:' .. qn, 1)
  if free == '1' and v[3] then free_key(v[3], id) end
  redis.call('PUBLISH', P .. ':done', id)
elseif v[1] == '"running"' and v[4] ~= 'true' then
  redis.call('HSET', key, 'cancel_requested', 'true')
  redis.call('HINCRBY', key, 'version', 1)
end
return redis.call('HGETALL', key)
"""
)

# ARGV: id. Deletes a terminal job; answers the record as it was, or nil. O(log N).
DELETE = _script(
    r"""
local id = ARGV[1]
local flat = redis.call('HGETALL', jk(id))
if #flat == 0 then return false end
local f = record(flat)
if f.state ~= '"queued"' and f.state ~= '"running"' then
  forget(id, f)
  redis.call('PUBLISH', P .. ':done', id)
end
return flat
""",
    frees=True,
)

# ARGV: queue name, ready_at, attempts, take keys (0/1), now, batch. Up to ``batch`` failed jobs
# of the queue become queued; answers {how many, how many entries it read}. O(batch × log N);
# the caller repeats until a batch reads fewer than ``batch``.
REDRIVE = _script(
    r"""
local qn, at, attempts, take, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local dead = P .. ':l:failed:' .. qn
local ids = redis.call('ZRANGE', dead, 0, tonumber(ARGV[6]) - 1)
local done = 0
for _, id in ipairs(ids) do
  local key = jk(id)
  redis.call('ZREM', dead, id)
  redis.call('ZREM', P .. ':l:failed', id)
  local v = redis.call('HMGET', key, 'state', 'key', 'expires_at')
  if v[1] == '"failed"' then
    redis.call('HSET', key, 'state', '"queued"', 'attempts', attempts, 'ready_at', at)
    redis.call('HDEL', key, 'finished_at', 'error')
    redis.call('HINCRBY', key, 'version', 1)
    redis.call('PERSIST', key)
    if v[3] then redis.call('ZREM', P .. ':x', expiring(id, 'failed', qn)) end
    redis.call('ZADD', qk(qn), at, id)
    if take == '1' and v[2] and not holder(v[2], now) then take_key(v[2], id) end
    done = done + 1
  end
end
if done > 0 then
  redis.call('HINCRBY', P .. ':n', 'failed:' .. qn, -done)
  redis.call('HINCRBY', P .. ':n', 'queued:' .. qn, done)
  if tonumber(at) <= now then redis.call('PUBLISH', P .. ':ready:' .. qn, '') end
end
return {done, #ids}
"""
)

# --- reads --------------------------------------------------------------------------------------

# ARGV: ids. Answers one record per id ({} when there is none). O(fields) each.
GET_MANY = _script(
    r"""
local out = {}
for a = 1, #ARGV do out[a] = redis.call('HGETALL', jk(ARGV[a])) end
return out
""",
    writes=False,
)

# ARGV: ids. Answers each job's version (nil when there is none). O(1) each.
VERSIONS = _script(
    r"""
local out = {}
for a = 1, #ARGV do out[a] = redis.call('HGET', jk(ARGV[a]), 'version') end
return out
""",
    writes=False,
)

# ARGV: the key (JSON text), now. Answers the holder's record, or nil. O(fields).
KEY_HOLDER = _script(
    r"""
local held = holder(ARGV[1], tonumber(ARGV[2]))
if not held then return false end
return redis.call('HGETALL', jk(held))
""",
    writes=False,
)

# KEYS[2]: the index to walk. ARGV: cursor ('' from the newest), limit, budget, then the filter's
# queue, state, handler, group, owner (JSON text, '' any). Walks the index from the cursor down,
# newest first, reading at most ``budget`` entries; an entry whose job is gone (expired by its
# TTL) is taken out of the index. Answers {records (up to limit + 1), the last id read, whether
# the index ended}. O(budget) at most.
LIST = _script(
    r"""
local index, cursor, limit, budget = KEYS[2], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local want = {ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]}
local top = cursor == '' and '+' or '(' .. cursor
local out, read, last = {}, 0, ''
while read < budget do
  local n = math.min(100, budget - read)
  local ids = redis.call('ZREVRANGEBYLEX', index, top, '-', 'LIMIT', 0, n)
  if #ids == 0 then return {out, last, 1} end
  for _, id in ipairs(ids) do
    read = read + 1
    last = id
    top = '(' .. id
    local v = redis.call('HMGET', jk(id), 'queue', 'state', 'handler', 'group_id', 'owner')
    if not v[1] then
      redis.call('ZREM', index, id)
    else
      local match = true
      for w = 1, 5 do
        if want[w] ~= '' and v[w] ~= want[w] then match = false end
      end
      if match then
        out[#out + 1] = redis.call('HGETALL', jk(id))
        if #out > limit then return {out, last, 0} end
      end
    end
  end
end
return {out, last, 0}
""",
    frees=True,
)

# ARGV: now, entries to read per queue at most. Answers {the counts (flat), per queue with
# queued jobs its name and the visible time of its oldest ready queued job}. O(queues × scan).
STATS = _script(
    r"""
local now, scan = ARGV[1], tonumber(ARGV[2])
local flat = redis.call('HGETALL', P .. ':n')
local oldest = {}
for i = 1, #flat, 2 do
  if string.sub(flat[i], 1, 7) == 'queued:' and tonumber(flat[i + 1]) > 0 then
    local qn = string.sub(flat[i], 8)
    local seen = redis.call('ZRANGEBYSCORE', qk(qn), '-inf', now, 'WITHSCORES', 'LIMIT', 0, scan)
    for j = 1, #seen, 2 do
      if redis.call('HGET', jk(seen[j]), 'state') == '"queued"' then
        oldest[#oldest + 1] = qn
        oldest[#oldest + 1] = seen[j + 1]
        break
      end
    end
  end
end
return {flat, oldest}
""",
    writes=False,
)

# --- maintenance --------------------------------------------------------------------------------

# ARGV: now, limit. Deletes up to ``limit`` terminal jobs whose expires_at passed, soonest first,
# each with its index entries and key; answers their records. An entry whose record Redis
# already expired (no sweeper ran for a day past its expiry) has its count taken back.
# O(limit × log N).
SWEEP = _script(
    r"""
local gone = redis.call('ZRANGEBYSCORE', P .. ':x', '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, member in ipairs(gone) do
  redis.call('ZREM', P .. ':x', member)
  local id, st, qn = string.match(member, '^([^\t]*)\t([^\t]*)\t(.*)$')
  local flat = redis.call('HGETALL', jk(id))
  if #flat == 0 then
    redis.call('HINCRBY', P .. ':n', st .. ':' .. qn, -1)
  else
    local f = record(flat)
    if f.state ~= '"queued"' and f.state ~= '"running"' then
      forget(id, f)
      out[#out + 1] = flat
    end
  end
end
return out
""",
    frees=True,
)

# KEYS[2]: the drop index (P:r:0 or P:r:1). ARGV: finished by (a time, or +inf), limit. Answers
# the records of up to ``limit`` succeeded jobs whose result may be dropped, earliest finished
# first; an entry whose job Redis expired is taken out. O(log N + limit).
DROPPABLE = _script(
    r"""
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local flat = redis.call('HGETALL', jk(id))
  if #flat == 0 then
    redis.call('ZREM', KEYS[2], id)
  else
    out[#out + 1] = flat
  end
end
return out
""",
    frees=True,
)

# KEYS[2]: the drop index. ARGV: the dropped result (JSON), then (id, free its key 0/1) pairs.
# Drops each result still in the index (so each to one caller); answers 1/0 per pair.
# O(log N) each.
DROP = _script(
    r"""
local out = {}
for a = 2, #ARGV, 2 do
  local id = ARGV[a]
  if redis.call('ZREM', KEYS[2], id) == 1 and redis.call('EXISTS', jk(id)) == 1 then
    redis.call('HSET', jk(id), 'result', ARGV[1])
    redis.call('HINCRBY', jk(id), 'version', 1)
    if ARGV[a + 1] == '1' then
      local key = redis.call('HGET', jk(id), 'key')
      if key then free_key(key, id) end
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
""",
    frees=True,
)

# --- the registry, marks ------------------------------------------------------------------------

# ARGV: id, last seen, the row (JSON), forget rows last seen before. O(log W).
WORKER_PUT = _script(
    r"""
redis.call('HSET', P .. ':w', ARGV[1], ARGV[3])
redis.call('ZADD', P .. ':ws', ARGV[2], ARGV[1])
local old = redis.call('ZRANGEBYSCORE', P .. ':ws', '-inf', '(' .. ARGV[4], 'LIMIT', 0, 100)
for _, id in ipairs(old) do
  redis.call('HDEL', P .. ':w', id)
  redis.call('ZREM', P .. ':ws', id)
end
return 1
"""
)

WORKER_REMOVE = _script(
    r"""
redis.call('HDEL', P .. ':w', ARGV[1])
redis.call('ZREM', P .. ':ws', ARGV[1])
return 1
"""
)

# ARGV: seen since. Answers the rows (JSON) of the workers seen since. O(log W + w).
WORKERS_SEEN = _script(
    r"""
local ids = redis.call('ZRANGEBYSCORE', P .. ':ws', ARGV[1], '+inf')
if #ids == 0 then return {} end
return redis.call('HMGET', P .. ':w', unpack(ids))
""",
    writes=False,
)

# ARGV: name, value. Sets the mark if absent or lower; answers it as it was (nil: absent). O(1).
MARK_ADVANCE = _script(
    r"""
local old = redis.call('HGET', P .. ':m', ARGV[1])
if not old or tonumber(old) < tonumber(ARGV[2]) then
  redis.call('HSET', P .. ':m', ARGV[1], ARGV[2])
end
return old
"""
)

SCRIPTS: dict[str, str] = {
    name: value
    for name, value in globals().items()
    if name.isupper() and isinstance(value, str) and value.startswith("#!lua")
}

# --- key names, as the scripts build them ------------------------------------------------------


def tag(prefix: str) -> str:
    """``P``: the hash tag every key of the deployment starts with (and ``KEYS[1]``)."""
    return "{" + prefix + "}"


def text(value: object) -> bytes:
    """A value as JSON text: how the record holds it, and how key names spell it."""
    return msgspec.json.encode(value)


def queue_name(queue: str) -> str:
    """The queue's name inside key and channel names: its JSON text without the quotes."""
    return text(queue)[1:-1].decode()


def list_index(
    p: str,
    *,
    queue: str | None,
    state: str | None,
    group_id: str | None,
    owner: str | None,
) -> str:
    """The listing index that narrows a filter the most (the script checks every field)."""
    if group_id is not None:
        return f"{p}:l:g:{text(group_id).decode()}"
    if owner is not None:
        return f"{p}:l:o:{text(owner).decode()}"
    if state in ("failed", "cancelled"):
        return f"{p}:l:{state}" + ("" if queue is None else f":{queue_name(queue)}")
    if queue is not None:
        return f"{p}:l:q:{queue_name(queue)}"
    return f"{p}:l"


def ready_channel(p: str, queue: str) -> str:
    return f"{p}:ready:{queue_name(queue)}"


def done_channel(p: str) -> str:
    return f"{p}:done"
