import { randomBytes } from 'node:crypto'
import type { Redis } from 'ioredis'
import type { Rate } from '../config.js'
import type { StoreFallback } from './fallback.js'
import { integers, LUA_NOW_MS, redisScript } from '../state/redis-script.js'
import type { Awaitable } from '../state/awaitable.js'
import { monotonicNow } from '../state/clock.js'
import { luaCooldownLeft, type CooldownCheck } from './cooldown.js'

/**
 * The org budget (`CV_RATE_LIMIT`): every upstream call, from any replica, takes one admission.
 *
 * Algorithm: an exact sliding-window log over a span s = w + g (window plus a small guard g). A
 * call at time t is admitted iff fewer than `limit` admissions lie in the closed interval
 * [t - s, t]; admitted calls are appended to the log.
 *
 * Bound: take any closed interval [a, a + s] and the calls admitted in it, t1 <= ... <= tk. When
 * tk was admitted, t1 ... t(k-1) were in the log and all lie in [tk - s, tk] (since
 * ti >= a >= tk - s), so k - 1 < limit <= count, hence k <= count. Every interval of the window's
 * length (w <= s), open or closed, admits at most `count`.
 *
 * The guard exists because the upstream counts arrivals, not our admissions: two calls admitted
 * exactly w apart can arrive less than w apart when the first was delayed more (event loop,
 * connecting, network; never a wait for a socket of the pool: the Care360 client asks for
 * admission only once it holds one). With g at least that delay difference, the upstream's own window
 * never sees more than `count` either. Default: 1% of the window, at most a second (600 ms of
 * the default 60 s), i.e. 1% of the throughput.
 *
 * Why not GCRA or a token bucket: with emission interval T and burst b, the same argument gives
 * up to b + w/T - 1 admissions per window, so honouring the bound forces T = w / (count - b + 1):
 * every unit of burst costs a unit of sustained rate (450/60 s with a burst of 50 sustains only
 * 401 per minute). The log gives both the full count and the full burst, at O(log n) per call
 * (ZADD, amortised ZREMRANGEBYSCORE) and at most `count` entries of memory, one key set in all.
 *
 * AIMD: the upstream's quota is per organization and other consumers of the same key (hidden
 * from us) draw from it, so a 429 proves that our share is smaller than `count` right now. After
 * an upstream 429 (once per cooldown episode, see upstream-gate.ts) the effective limit is
 * halved, then recovers linearly, by `count` per `recoverMs`, back to `count`. Without it, every
 * cooldown would end in the same burst and the same 429.
 */
export type BudgetDecision =
  | { ok: true, remaining: number }
  | { ok: false, retryAfterMs: number }
  /** Refused because the upstream cooldown runs (the budget is not drawn). */
  | { ok: false, coolingMs: number }

export interface BudgetStore {
  /**
   * One admission, or a refusal. With `cooldown`, a running cooldown refuses first and spends
   * nothing; in Redis both are one script, so one round trip.
   */
  take: (cooldown?: CooldownCheck) => Awaitable<BudgetDecision>
  /** Multiplicative decrease of the effective limit after an upstream 429. */
  decrease: () => Awaitable<void>
  /** Admissions left in the window now, taking nothing (the metrics' gauge, read when scraped). */
  remaining: () => Awaitable<number>
}

export interface BudgetOptions extends Rate {
  /** Time for the effective limit to climb from 0 back to `count` after a decrease (ms). */
  recoverMs?: number
  /** Added to the window against delivery jitter (ms); 1% of the window, at most 1 s, by default. */
  guardMs?: number
}

const DECREASE_FACTOR = 0.5
/** The default climb back: from half to full in five windows. */
const RECOVER_WINDOWS = 10

function recoverMsOf (options: BudgetOptions): number {
  return options.recoverMs ?? options.windowMs * RECOVER_WINDOWS
}

/** The span the log counts over: the window plus the guard. */
function spanOf (options: BudgetOptions): number {
  return options.windowMs + (options.guardMs ?? Math.min(1000, Math.floor(options.windowMs / 100)))
}

interface Decreased { floor: number, at: number }

function effectiveLimit (decreased: Decreased | null, at: number, count: number, recoverMs: number): number {
  if (decreased === null) return count
  return Math.min(count, decreased.floor + Math.floor(Math.max(0, at - decreased.at) * count / recoverMs))
}

/** When a denied caller can next be admitted: an old entry leaves the window, or the limit grows. */
function waitMs (oldestToLeave: number, used: number, decreased: Decreased | null, at: number, count: number, windowMs: number, recoverMs: number): number {
  let next = oldestToLeave + windowMs + 1
  if (decreased !== null && used < count) {
    next = Math.min(next, decreased.at + Math.ceil((used + 1 - decreased.floor) * recoverMs / count))
  }
  return Math.max(1, next - at)
}

export interface MemoryBudgetOptions extends BudgetOptions {
  now?: () => number
  /** As the twin of a Redis budget: keep the times of what `take` admits for `takeAlone`. */
  trackAlone?: boolean
}

/** Calls admitted alone, by time, and the time they were handed on (both on the twin's clock). */
export interface AloneCalls {
  times: readonly number[]
  at: number
}

const NO_CALLS: AloneCalls = Object.freeze({ times: Object.freeze([]), at: 0 })

/** The most calls made alone that one script enters into Redis's log; the rest go with later calls. */
export const REPLAY_BATCH = 1000

/** The memory budget answers at once. */
export interface MemoryBudget extends BudgetStore {
  take: (cooldown?: CooldownCheck) => BudgetDecision
  decrease: () => void
  remaining: () => number
  /**
   * As the twin of a Redis budget: counts an admission Redis made for this process, so that a
   * fallback counts this process's recent calls whichever store admitted them.
   */
  record: () => void
  /**
   * As the twin of a Redis budget: an admission held while Redis decides, made at `at`. No
   * cooldown check (the script checks the shared one).
   */
  reserve: () => { decision: BudgetDecision, at: number }
  /** Takes back the admission `reserve` made at `at` (Redis refused, or failed). */
  unreserve: (at: number) => void
  /**
   * With `trackAlone`: the oldest (up to `max`) of the admissions `take` made alone (while Redis
   * could not answer) within the span that Redis has not been told of yet; they are now in the
   * caller's hands. `restoreAlone` gives them back when Redis could not take them.
   */
  takeAlone: (max: number) => AloneCalls
  restoreAlone: (times: readonly number[]) => void
}

/**
 * Admission times, oldest first, in a ring that doubles when full. Entries leave from the front
 * as they age out of the window; nothing is copied per call, whatever the budget's size (a log
 * of a large budget under load is tens of thousands of entries).
 */
class AdmissionLog {
  #times = new Float64Array(64)
  #start = 0
  #length = 0

  get length (): number {
    return this.#length
  }

  /** The i-th oldest entry. */
  at (index: number): number {
    return this.#times[(this.#start + index) & (this.#times.length - 1)] as number
  }

  newest (): number | undefined {
    return this.#length === 0 ? undefined : this.at(this.#length - 1)
  }

  push (time: number): void {
    if (this.#length === this.#times.length) this.#grow()
    this.#times[(this.#start + this.#length) & (this.#times.length - 1)] = time
    this.#length += 1
  }

  /** Removes the newest entry equal to `time`, if one is left. */
  remove (time: number): void {
    const mask = this.#times.length - 1
    for (let i = this.#length - 1; i >= 0; i--) {
      const at = this.at(i)
      if (at < time) return
      if (at === time) {
        for (let j = i; j < this.#length - 1; j++) this.#times[(this.#start + j) & mask] = this.at(j + 1)
        this.#length -= 1
        return
      }
    }
  }

  /** Drops the entries older than `time`. */
  dropBefore (time: number): void {
    const mask = this.#times.length - 1
    while (this.#length > 0 && (this.#times[this.#start] as number) < time) {
      this.#start = (this.#start + 1) & mask
      this.#length -= 1
    }
  }

  #grow (): void {
    const times = new Float64Array(this.#times.length * 2)
    for (let i = 0; i < this.#length; i++) times[i] = this.at(i)
    this.#times = times
    this.#start = 0
  }
}

/** The refusal of a cooldown running in this process, or null when none runs. */
function coolingHere (cooldown: CooldownCheck): BudgetDecision | null {
  const coolingMs = cooldown.memory()
  return coolingMs > 0 ? { ok: false, coolingMs } : null
}

export function createMemoryBudget (options: MemoryBudgetOptions): MemoryBudget {
  const now = options.now ?? monotonicNow
  const { count } = options
  const windowMs = spanOf(options)
  const recoverMs = recoverMsOf(options)
  const log = new AdmissionLog()
  let decreased: Decreased | null = null

  function clock (): number {
    // Never behind the newest entry, so the log stays sorted even if the clock steps back.
    const at = now()
    const last = log.newest()
    return last === undefined ? at : Math.max(at, last)
  }

  /** The limit at `at`, the log holding only the admissions of the span up to it. */
  function limitAt (at: number): number {
    log.dropBefore(at - windowMs)
    if (decreased !== null && effectiveLimit(decreased, at, count, recoverMs) >= count) decreased = null
    return effectiveLimit(decreased, at, count, recoverMs)
  }

  /** Admitted at `at` (appended to the log), or refused. */
  function admit (at: number): BudgetDecision {
    const limit = limitAt(at)
    const used = log.length
    if (used < limit) {
      log.push(at)
      return { ok: true, remaining: limit - used - 1 }
    }
    return { ok: false, retryAfterMs: waitMs(log.at(used - limit), used, decreased, at, count, windowMs, recoverMs) }
  }

  // With `trackAlone`, the times of the admissions `take` made, until a Redis twin hands them on;
  // at most the share within the span (older ones no longer matter to anyone).
  let alone = options.trackAlone === true ? new AdmissionLog() : null

  function take (cooldown?: CooldownCheck): BudgetDecision {
    const cooling = cooldown === undefined ? null : coolingHere(cooldown)
    if (cooling !== null) return cooling
    const at = clock()
    const decision = admit(at)
    if (decision.ok && alone !== null) {
      alone.dropBefore(at - windowMs)
      alone.push(at)
    }
    return decision
  }

  function takeAlone (max: number): AloneCalls {
    if (alone === null || alone.length === 0) return NO_CALLS
    const at = clock()
    alone.dropBefore(at - windowMs)
    const times: number[] = []
    const rest = new AdmissionLog()
    for (let i = 0; i < alone.length; i++) {
      if (i < max) times.push(alone.at(i))
      else rest.push(alone.at(i))
    }
    alone = rest
    return { times, at }
  }

  function restoreAlone (times: readonly number[]): void {
    if (alone === null || times.length === 0) return
    // Older than every call admitted alone since they were taken: the log stays sorted.
    const merged = new AdmissionLog()
    for (const time of times) merged.push(time)
    for (let i = 0; i < alone.length; i++) merged.push(alone.at(i))
    alone = merged
  }

  function decrease (): void {
    const at = clock()
    decreased = { floor: Math.max(1, Math.floor(effectiveLimit(decreased, at, count, recoverMs) * DECREASE_FACTOR)), at }
  }

  function record (): void {
    const at = clock()
    log.dropBefore(at - windowMs)
    log.push(at)
  }

  function reserve (): { decision: BudgetDecision, at: number } {
    const at = clock()
    return { decision: admit(at), at }
  }

  return {
    take,
    decrease,
    remaining: () => Math.max(0, limitAt(clock()) - log.length),
    record,
    reserve,
    unreserve: (at) => { log.remove(at) },
    takeAlone,
    restoreAlone
  }
}

/**
 * Lua: the effective limit now (`limit`), from the decrease state in hash `key`, and the state
 * itself (`floor`, `at`: nil when not decreased), as effectiveLimit computes them. Needs the
 * locals `now`, `count` and `recover`.
 */
function luaLimit (key: string): string {
  return `local limit, floor, at = count, nil, nil
local state = redis.call('HMGET', ${key}, 'floor', 'at')
if state[1] then
  floor = tonumber(state[1])
  at = tonumber(state[2])
  limit = math.min(count, floor + math.floor(math.max(0, now - at) * count / recover))
end`
}

/**
 * Enters calls a replica admitted alone into the log (KEYS[1]), from ARGV[first] on: the replica's
 * clock when it sent them, its source id, then their times on its clock. Each lands at its age on
 * Redis's clock. Members name the source and the time (and which of equal times), so that a replay
 * sent again, after a timeout that hid its success, adds nothing.
 */
function luaReplay (first: number, spanArg: number): string {
  return `
if #ARGV > ${first} then
  local sent = tonumber(ARGV[${first}])
  local source = ARGV[${first + 1}]
  local previous, occurrence = nil, 0
  for i = ${first + 2}, #ARGV do
    if ARGV[i] == previous then occurrence = occurrence + 1 else previous, occurrence = ARGV[i], 0 end
    redis.call('ZADD', KEYS[1], int(now - (sent - tonumber(ARGV[i]))), 'r:' .. source .. ':' .. ARGV[i] .. ':' .. occurrence)
  end
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[${spanArg}]) + 1)
end`
}

// KEYS: log. ARGV: span, then the replay (luaReplay). Used when this replica's share refuses a
// call, so that its calls made alone still reach Redis.
const replayScript = redisScript('bffBudgetReplay', 1, `${LUA_NOW_MS}${luaReplay(2, 1)}
return 1
`)

// KEYS: log (sorted set), sequence, decrease state, and the cooldown record when it is checked.
// ARGV: count, span (window + guard), recoverMs, then a replay of calls made alone (luaReplay),
// entered first. Answers { 1, remaining }, { 0, retry after } or, while the cooldown runs,
// { 2, time left in it }.
const takeScript = redisScript('bffBudgetTake', 'variable', `${LUA_NOW_MS}${luaReplay(4, 2)}
if KEYS[4] then
  local cooling = ${luaCooldownLeft('KEYS[4]')}
  if cooling > 0 then return { 2, cooling } end
end
local count = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local recover = tonumber(ARGV[3])
${luaLimit('KEYS[3]')}
-- Entries strictly older than now - window leave; the closed interval [now - window, now] stays.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. int(now - window))
local used = redis.call('ZCARD', KEYS[1])
if used < limit then
  local seq = redis.call('INCR', KEYS[2])
  redis.call('ZADD', KEYS[1], int(now), int(now) .. '-' .. seq)
  redis.call('PEXPIRE', KEYS[1], window + 1)
  redis.call('PEXPIRE', KEYS[2], window + 1)
  return { 1, limit - used - 1 }
end
local oldest = redis.call('ZRANGE', KEYS[1], used - limit, used - limit, 'WITHSCORES')
local next = tonumber(oldest[2]) + window + 1
if floor and used < count then
  next = math.min(next, at + math.ceil((used + 1 - floor) * recover / count))
end
return { 0, math.max(1, next - now) }
`)

// KEYS: decrease state. ARGV: count, recoverMs.
const decreaseScript = redisScript('bffBudgetDecrease', 1, `${LUA_NOW_MS}
local count = tonumber(ARGV[1])
local recover = tonumber(ARGV[2])
${luaLimit('KEYS[1]')}
redis.call('HSET', KEYS[1], 'floor', math.max(1, math.floor(limit * ${DECREASE_FACTOR})), 'at', int(now))
-- Fully recovered by then: the state may go.
redis.call('PEXPIRE', KEYS[1], recover)
return 1
`)

// KEYS: log, decrease state. ARGV: count, span, recoverMs. What takeScript would answer as
// `remaining` plus one, or 0 when it would refuse; it changes nothing.
const remainingScript = redisScript('bffBudgetRemaining', 2, `${LUA_NOW_MS}
local count = tonumber(ARGV[1])
local recover = tonumber(ARGV[3])
${luaLimit('KEYS[2]')}
return math.max(0, limit - redis.call('ZCOUNT', KEYS[1], int(now - tonumber(ARGV[2])), '+inf'))
`)

export interface RedisBudgetOptions extends BudgetOptions {
  fallback: StoreFallback
  /**
   * Every key of the budget carries this hash tag, so the scripts' keys share one slot on
   * Redis Cluster.
   */
  tag?: string
  /** The twin that answers while Redis cannot (already split between replicas). */
  memory: MemoryBudget
  /** Every admission needs the twin too (one replica: the twin's share is the whole count). */
  bothAlways?: boolean
}

/**
 * Across a Redis outage. Redis's log cannot see what replicas admit while they count alone, and
 * their memory cannot see what Redis admitted before. So:
 *
 * 1. Each replica's memory twin counts all of this replica's admissions, whichever store made
 *    them: when Redis fails, the twin refuses once this replica's calls of the last span, through
 *    Redis or not, reach its share.
 * 2. A replica's calls to Redis after an outage enter the calls it admitted alone into Redis's log
 *    (at their ages, on Redis's clock), in the same script as an admission, or alone when its
 *    share refuses the call; up to REPLAY_BATCH per call. Their members name the replica and the
 *    call, so a replay sent again after a timeout that hid its success adds nothing.
 * 3. For one span after this replica's shared state is `redis` again (any break it saw: a lost
 *    connection, a failed command), an admission needs both Redis and the twin, so that replicas
 *    already back keep to their shares while others are still away. With one replica, always:
 *    its twin holds every call, which keeps the count exact even if Redis loses its data.
 *
 * Bounds. One replica: exact (a restart of the process during an outage forgets what it admitted
 * alone). Several: exact once every replica that counted alone has called Redis again, within a
 * span of the first one back. Beyond that, an interval can exceed the count by what replicas had
 * sent beyond their shares in the span before Redis failed (nothing under a balanced load: a
 * window's calls are at most the sum over replicas of the larger of what each sent and its
 * share), and by the calls a replica admitted alone and kept from Redis for longer than a span:
 * one cut off while the others still reach Redis (a partial partition), one idle since its
 * return, or one whose failure the others never saw (Redis refused its commands only: they sent
 * none meanwhile). No scheme without a channel between the replicas avoids these. The price of
 * (3): a replica with more than its share of the traffic gets 429s for one span after a break,
 * while Redis itself would still admit; and a 429 from the upstream during an outage halves only
 * the twins, whose limit then recovers over the usual five windows (from half the count). A 429
 * while Redis answers halves Redis's limit and the twin of the replica that got it (the others'
 * twins learn of it only from a 429 of their own).
 */
export function createRedisBudget (options: RedisBudgetOptions): BudgetStore {
  const { count, memory, fallback } = options
  const windowMs = spanOf(options)
  const recoverMs = recoverMsOf(options)
  const bothAlways = options.bothAlways ?? false
  const tag = `{${options.tag ?? 'bff:budget'}}`
  const keys = [`${tag}:log`, `${tag}:seq`, `${tag}:aimd`] as const
  // Names this process's replayed calls in Redis's log.
  const source = randomBytes(6).toString('hex')
  function replayArgs (alone: AloneCalls): string[] {
    return alone.times.length === 0 ? [] : [String(alone.at), source, ...alone.times.map(String)]
  }
  async function redisDecision (redis: Redis, cooldownKey: string | null, alone: AloneCalls): Promise<BudgetDecision> {
    const replay = replayArgs(alone)
    const reply = await (cooldownKey === null
      ? takeScript(redis, 3, ...keys, count, windowMs, recoverMs, ...replay)
      : takeScript(redis, 4, ...keys, cooldownKey, count, windowMs, recoverMs, ...replay))
    const [verdict, value] = integers(reply, 2) as [number, number]
    if (verdict === 1) return { ok: true, remaining: value }
    return verdict === 2 ? { ok: false, coolingMs: value } : { ok: false, retryAfterMs: value }
  }
  /** An admission needs the twin's too (see 3. above). */
  function twinToo (): boolean {
    return bothAlways || fallback.redisFor() <= windowMs
  }
  async function takeInRedis (redis: Redis, cooldownKey: string | null): Promise<BudgetDecision> {
    let held: { at: number, remaining: number } | null = null
    if (twinToo()) {
      const reserved = memory.reserve()
      if (!reserved.decision.ok) {
        await replayOnly(redis)
        return reserved.decision
      }
      held = { at: reserved.at, remaining: reserved.decision.remaining }
    }
    let decision
    try {
      decision = await withAlone((alone) => redisDecision(redis, cooldownKey, alone))
    } catch (error) {
      // Not counted here: the fallback's own take counts this call instead.
      if (held !== null) memory.unreserve(held.at)
      throw error
    }
    if (held === null) {
      if (decision.ok) memory.record()
      return decision
    }
    if (!decision.ok) {
      memory.unreserve(held.at)
      return decision
    }
    return { ok: true, remaining: Math.min(decision.remaining, held.remaining) }
  }
  /**
   * Sends a batch of the calls made alone with `send`; if Redis fails, they go with a later call
   * (and if this one reached Redis after all, their members are the same).
   */
  async function withAlone<T> (send: (alone: AloneCalls) => Promise<T>): Promise<T> {
    const alone = memory.takeAlone(REPLAY_BATCH)
    try {
      return await send(alone)
    } catch (error) {
      memory.restoreAlone(alone.times)
      throw error
    }
  }
  /** Calls made alone still go to Redis when this replica's share refuses the call itself. */
  async function replayOnly (redis: Redis): Promise<void> {
    await withAlone(async (alone) => {
      if (alone.times.length > 0) await replayScript(redis, keys[0], windowMs, ...replayArgs(alone))
    })
  }
  async function decreaseInRedis (redis: Redis): Promise<void> {
    await decreaseScript(redis, keys[2], count, recoverMs)
  }
  // The shared cooldown's read while paused, when one is under way.
  let reading: Promise<number> | null = null
  async function remainingInRedis (redis: Redis): Promise<number> {
    const left = Number(await remainingScript(redis, keys[0], keys[2], count, windowMs, recoverMs))
    return twinToo() ? Math.min(left, memory.remaining()) : left
  }
  return {
    take (cooldown) {
      // A cooldown held only in this process (no key) is checked here; a shared one in the script.
      const cooling = cooldown?.key === null ? coolingHere(cooldown) : null
      if (cooling !== null) return cooling
      const shared = cooldown?.shared
      return fallback.run((redis) => takeInRedis(redis, cooldown?.key ?? null), () => memory.take(cooldown), shared === undefined
        ? undefined
        // Paused after a failed command, on a connected client: the budget counts in memory, but
        // the shared cooldown, which this process's twin may never have heard of (another replica
        // got the 429), is still read. Without it a Redis blip on any replica would open a window
        // of calls to an upstream that asked for none. Calls at the same time share one read.
        : async function coolingOrShare (redis): Promise<BudgetDecision> {
          reading ??= shared(redis).finally(() => { reading = null })
          const coolingMs = await reading
          return coolingMs > 0 ? { ok: false, coolingMs } : memory.take(cooldown)
        })
    },
    async decrease () {
      // The twin too, whatever Redis says: the 429 shows the upstream's room is smaller now, and
      // a Redis outage right after it would otherwise send at the full share (its limit recovers
      // over the same span as Redis's).
      memory.decrease()
      await fallback.run(decreaseInRedis, () => {})
    },
    remaining: () => fallback.run(remainingInRedis, memory.remaining)
  }
}

export interface OrgBudgetOptions extends BudgetOptions {
  fallback: StoreFallback
  /** The most replicas that run at once: the per-process share while Redis cannot answer. */
  replicas: number
  tag?: string
  now?: () => number
}

/**
 * The org budget as the app uses it: Redis when it answers, else this process's share of the
 * count (floor(count / replicas), at least 1), so that all replicas together still stay within
 * the count while each counts alone. Without Redis configured, the same share: REPLICAS above 1
 * then says several processes run without one (a warning at start, limits/plugins.ts).
 */
export function createOrgBudget (options: OrgBudgetOptions): BudgetStore {
  const share = Math.max(1, Math.floor(options.count / options.replicas))
  const memory = createMemoryBudget({
    trackAlone: options.fallback.redisConfigured,
    count: share,
    windowMs: options.windowMs,
    guardMs: spanOf(options) - options.windowMs,
    recoverMs: recoverMsOf(options),
    now: options.now
  })
  return options.fallback.redisConfigured ? createRedisBudget({ ...options, memory, bothAlways: options.replicas === 1 }) : memory
}
