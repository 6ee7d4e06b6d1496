import { performance } from 'node:perf_hooks'
import { Redis, type Command, type RedisOptions } from 'ioredis'
import type { FastifyBaseLogger } from 'fastify'
import { defineScripts, LUA_NOW_MS } from './redis-script.js'
import { TroubleNotice } from './notice.js'

/** How shared state is held right now, as `/readyz` reports it. */
export type SharedStateMode = 'redis' | 'degraded' | 'memory'

/**
 * The one Redis connection of a process, shared by every store, and the view of its health that
 * the stores use to decide between Redis and their in-memory fallback.
 */
export interface SharedState {
  readonly redis: Redis | null
  /**
   * `degraded` while the client is not connected, and for a while after a store found Redis
   * unable to answer while connected (errors, timeouts: see `degradeFor`).
   */
  mode: () => SharedStateMode
  /**
   * A store's command failed or timed out on a connected client: for `ms`, `mode()` says
   * `degraded`, since stores count in memory meanwhile (OOM, READONLY, MISCONF, a stalled Redis).
   */
  degradeFor: (ms: number) => void
  /**
   * How long (ms) `mode()` has said `redis` without a break: 0 while it does not, else since the
   * client last came back (for its first connection: since Redis's data began, the age of
   * DATA_SINCE_KEY; 0 until that is known) or a failed
   * command's pause ended. The org budget is careful for a while after a break.
   */
  redisFor: () => number
  /**
   * Redis's `maxmemory-policy`, as `INFO memory` last told it (read each time the client becomes
   * ready, and every `policyCheckEveryMs`); null without Redis, before it is known, or when INFO is
   * refused (an ACL) or does not name it. Any
   * policy but `noeviction` may evict the service's state: every key of ours has a TTL, so the
   * volatile-* policies evict them too. (Optional for stand-ins; createSharedState's has it.)
   */
  evictionPolicy?: () => string | null
  /**
   * Calls `listener` each time `mode()` turns `redis` after a break: every time the client becomes
   * ready (a reconnection, to a Redis that may have lost its data), and when a failed command's
   * pause ends on a live connection (what the stores wrote meanwhile went to memory only). Not
   * awaited; a rejection is logged. (Optional for stand-ins; createSharedState's has it.)
   */
  onBack?: (listener: () => unknown) => void
  close: () => Promise<void>
}

export interface SharedStateOptions {
  url: string | null
  log: FastifyBaseLogger
  /** Bound on any wait for Redis, in ms: a command that gets no answer in time fails (250 by default). */
  commandTimeoutMs?: number
  /** A connection that receives nothing for this long with commands outstanding is replaced (ms; SOCKET_TIMEOUT_MS by default). */
  socketTimeoutMs?: number
  /** How often a still-degraded state is logged again (ms). */
  logEveryMs?: number
  /** Injected for tests; a monotonic clock otherwise (only durations are compared on it). */
  now?: () => number
  /**
   * How often Redis's maxmemory-policy is read again while the service runs (ms; five minutes by
   * default): a policy changed on the live server is seen, and a read that failed is retried.
   */
  policyCheckEveryMs?: number
}

export function createSharedState (options: SharedStateOptions): Required<SharedState> {
  const commandTimeoutMs = options.commandTimeoutMs ?? 250
  if (options.url === null) {
    return { redis: null, mode: () => 'memory', degradeFor: () => {}, redisFor: () => 0, evictionPolicy: () => null, onBack: () => {}, close: async () => {} }
  }
  const now = options.now ?? (() => performance.now())
  const logEveryMs = options.logEveryMs ?? 60_000
  // The one bound on a wait for Redis: a command that gets no answer in time fails, and the store
  // that sent it falls back (limits) or answers 503 (sessions, keyed idempotency). Ours rather
  // than ioredis's commandTimeout: see CommandBound.
  // On the real clock whatever `now` a test injects: the bound is about time that really passes.
  let lastReadOnlyReconnect = Number.NEGATIVE_INFINITY
  const redis = new BoundedRedis(new CommandBound(commandTimeoutMs, () => performance.now()), options.url, {
    // A disconnected client must fail a command at once rather than queue it: requests never
    // wait on a Redis outage, the stores fall back instead.
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    // A connection whose peer went silent without a reset (a node lost, a failover that moved the
    // address) stays open, and `ready`, until the kernel gives up on its unacknowledged data
    // (about 15 minutes): every command meanwhile waits out its timeout, and the queue grows. So a
    // connection with commands outstanding that receives nothing for this long is destroyed, and
    // the client reconnects. Commands that timed out (failed back to the stores) are among those.
    // ioredis's timer is a plain one, so a stall of the event loop counts towards it (the answer
    // may be waiting in the socket): long enough that only a pathological stall reaches it.
    socketTimeout: Math.max(options.socketTimeoutMs ?? SOCKET_TIMEOUT_MS, 4 * commandTimeoutMs),
    // The same for an idle connection, from the kernel's side.
    keepAlive: 10_000,
    connectTimeout: 1000,
    // Keep reconnecting for ever, backing off to 2 s, so that recovery is automatic.
    retryStrategy: (attempt: number) => Math.min(50 * 2 ** Math.min(attempt, 6), 2000),
    // A failover that demotes the node this connection is on, while the node stays up as a
    // replica, closes nothing: every write answers READONLY for as long as the connection lives.
    // Reconnecting finds the new primary (the endpoint moved on). 1: reconnect only, never resend
    // (2), which would run a script that is not idempotent twice; the store that got the error has
    // already fallen back or answered 503. At most once per READONLY_RECONNECT_EVERY_MS: an
    // endpoint that stays a replica (a DNS slow to move, a REDIS_URL naming a replica) must not
    // become a reconnect for every write.
    reconnectOnError: function reconnectIfReadOnly (error: Error) {
      const at = performance.now()
      if (!error.message.startsWith('READONLY') || at - lastReadOnlyReconnect < READONLY_RECONNECT_EVERY_MS) return false
      lastReadOnlyReconnect = at
      return 1
    },
    lazyConnect: false,
    // RESP2, as every Redis and Redis-compatible server or proxy speaks it, rather than ioredis 6's
    // RESP3 (HELLO 3 at each connection): nothing here uses RESP3's push messages or types, and
    // the Smart Client Handoff notifications it brings (Redis Cloud and Enterprise) would stretch
    // the socket timeout above to 10 s during a maintenance. The replies' shapes are the same.
    protocol: 2
  })
  defineScripts(redis)
  // Redis unreachable, and "reachable again"; a database refused has a line of its own.
  const outage = new TroubleNotice(logEveryMs, now)
  const refusedDatabase = new TroubleNotice(logEveryMs, now)
  let degraded = false
  // When the client last became ready.
  let backAt = Number.NEGATIVE_INFINITY
  const log = options.log
  // ioredis emits 'error' on every failed reconnect; one line per interval is enough for operators.
  redis.on('error', function onRedisError (error: NodeJS.ErrnoException & { command?: { name?: string } }) {
    if (error.command?.name === 'select') {
      // The database REDIS_URL names was refused (beyond the server's `databases`, a Cluster, an
      // ACL): ioredis goes on, ready, on database 0, where the state would mix with whatever else
      // lives there. The connection is dropped instead, before it is ready, and retried on the
      // usual backoff (the server may be reconfigured); meanwhile the service is degraded.
      redis.disconnect(true)
      if (refusedDatabase.tell()) {
        // This line says why the service is degraded: not followed by the generic one for the
        // dropped connection's own errors (its ready check fails "Stream isn't writeable").
        outage.told()
        // The reply's text only ("ERR DB index is out of range"): never the URL or its database.
        log.error({ err: { message: error.message } }, 'shared state: Redis refused the database REDIS_URL names; using per-process fallback until it accepts it')
      }
      return
    }
    if (outage.tell()) {
      log.warn({ err: { code: error.code, message: error.message } }, 'shared state: Redis unreachable, using per-process fallback')
    }
  })
  const policy = watchEvictionPolicy(redis, log)
  // Between connections too (a read while disconnected fails and is ignored: the next ready reads).
  const policyTimer = setInterval(policy.read, options.policyCheckEveryMs ?? 300_000)
  policyTimer.unref()
  const backListeners: Array<() => unknown> = []
  function back (): void {
    for (const listener of backListeners) {
      Promise.resolve().then(listener).catch(function backListenerFailed (error: unknown) {
        // Its name and code only: an ioredis error carries its command's arguments (keys).
        log.error({ err: { name: (error as Error).name, code: (error as { code?: unknown }).code } }, 'shared state: a task run when Redis is back failed')
      })
    }
  }
  let connections = 0
  redis.on('ready', function onRedisReady () {
    const sawBreak = degraded
    // After every outage line, so that the log never ends on an outage that is over; otherwise
    // once per interval: a connection that keeps breaking and coming back must not write a line
    // each time.
    if (sawBreak && outage.clear(true)) {
      log.info('shared state: Redis reachable again')
    }
    const readyAt = now()
    backAt = readyAt
    degraded = false
    policy.read()
    back()
    if (connections++ > 0 || sawBreak) return
    // The first connection, with no break seen before it: Redis's data holds what every replica
    // did through it for as long as that data has existed, so that is the span without a break.
    // Data younger than that (a Redis restarted empty, or flushed) while the other replicas still
    // count their recent calls in memory: a process starting then keeps to its share for a span,
    // as a replica that comes back does (org-budget.ts), instead of finding an empty log and
    // taking the whole count. Until the age is known (or if it cannot be), it is as careful.
    dataAgeScript(redis).then(function sinceDataBegan (ageMs: number) {
      if (backAt === readyAt) backAt = readyAt - ageMs
    // The script refused (a locked-down Redis) or lost: careful, as after a break.
    }, function stayCareful () {})
  })
  redis.on('close', function onRedisClose () {
    degraded = true
  })
  let failingUntil = Number.NEGATIVE_INFINITY
  const mode = (): SharedStateMode => (redis.status === 'ready' && now() >= failingUntil ? 'redis' : 'degraded')
  // The end of a failed command's pause, for the listeners of `onBack`: one timer at a time, armed
  // only when someone listens, moved on if the pause grew meanwhile.
  let pauseTimer: NodeJS.Timeout | null = null
  function watchPauseEnd (): void {
    if (pauseTimer !== null || backListeners.length === 0) return
    pauseTimer = setTimeout(function pauseEnded () {
      pauseTimer = null
      if (now() < failingUntil) watchPauseEnd()
      else if (redis.status === 'ready') back()
    }, Math.max(PAUSE_END_MIN_WAIT_MS, failingUntil - now()))
    pauseTimer.unref()
  }
  return {
    redis,
    mode,
    degradeFor (ms) {
      failingUntil = Math.max(failingUntil, now() + ms)
      watchPauseEnd()
    },
    // ioredis sets its status to ready a tick before it emits 'ready': until then, not back yet.
    redisFor: () => (mode() === 'redis' && !degraded ? now() - Math.max(backAt, failingUntil) : 0),
    evictionPolicy: policy.current,
    onBack (listener) { backListeners.push(listener) },
    close: async () => {
      clearInterval(policyTimer)
      if (pauseTimer !== null) clearTimeout(pauseTimer)
      pauseTimer = null
      backListeners.length = 0
      redis.disconnect(false)
    }
  }
}

/**
 * How long a failed or slow command leaves the shared state `degraded` (ms; SharedState.degradeFor):
 * whichever store's command it was (limits, sessions, Idempotency-Key records).
 */
export const FAILED_COMMAND_PAUSE_MS = 1000

/** How often a connection answering READONLY may be replaced (ms). */
const READONLY_RECONNECT_EVERY_MS = 5000

/** The least wait of the pause-end timer (ms), whatever a test's clock says. */
const PAUSE_END_MIN_WAIT_MS = 10

/** The one policy under which Redis never evicts the service's state. */
export const SAFE_EVICTION_POLICY = 'noeviction'

/**
 * Reads Redis's `maxmemory-policy` from `INFO memory` (CONFIG GET is often disabled on managed
 * Redis) each time the client becomes ready, since the connection may now reach another server
 * (a failover, a new endpoint behind the same address), and every few minutes (policyCheckEveryMs),
 * since the server may be reconfigured live. A policy that may evict is an error line at each read
 * (the service keeps running: the state works until memory runs short, and refusing to start
 * would turn a misconfiguration into an outage); the metric bff_redis_eviction_policy_safe shows
 * it too. An INFO that fails (an ACL forbids it, a timeout) leaves the policy unknown and the
 * connection as it is: one warning, until a read succeeds again.
 */
function watchEvictionPolicy (redis: Redis, log: FastifyBaseLogger): { read: () => void, current: () => string | null } {
  let policy: string | null = null
  let unreadableLogged = false
  function unreadable (cause: string): void {
    policy = null
    if (unreadableLogged) return
    unreadableLogged = true
    log.warn({ redis: { cause } }, 'shared state: cannot read Redis\'s maxmemory-policy (INFO memory); it must be noeviction, or Redis may evict sessions, Idempotency-Key records and limits')
  }
  return {
    current: () => policy,
    read () {
      redis.info('memory').then(function evictionPolicyRead (info: string) {
        const found = /^maxmemory_policy:([a-z0-9-]{1,64})\r?$/m.exec(info)?.[1]
        /* c8 ignore next 4 -- every Redis since 2.8 names it in INFO memory; a Redis-compatible server that does not is warned about here */
        if (found === undefined) {
          unreadable('no maxmemory_policy field')
          return
        }
        policy = found
        unreadableLogged = false
        if (found === SAFE_EVICTION_POLICY) return
        log.error({ redis: { maxmemoryPolicy: found } }, `shared state: Redis runs with maxmemory-policy ${found}, not noeviction: at maxmemory it may evict the service's state (every key of ours has a TTL, so volatile-* policies do too), and then a retried Idempotency-Key can call Care360 a second time, sessions end early, and rate limits, the org budget and the upstream cooldown undercount. Set maxmemory-policy noeviction`)
      }, function evictionPolicyUnread (error: unknown) {
        // Lost with its connection, or sent without one: the next connection reads again.
        if (redis.status !== 'ready') return
        // A reply error's code word (NOPERM, ERR, ...), never the rest of its text.
        /* c8 ignore next -- a timeout, or an error without a code word, needs a Redis that stops answering INFO alone; NOPERM (an ACL) is tested */
        unreadable(isCommandTimeout(error) ? 'timeout' : /^[A-Z]{2,20}(?= |$)/.exec((error as Error).message)?.[0] ?? 'error')
      })
    }
  }
}

/**
 * How long (ms) the data of this Redis has existed: the age of a marker set on first use, with no
 * expiry. It goes where the data goes (persistence, a replica promoted) and is gone with it (a
 * restart without persistence, FLUSHALL), which Redis's uptime does not tell. Redis must not
 * evict the service's state (`maxmemory-policy noeviction`, README): an evicted budget log beside
 * a kept marker would look whole.
 */
async function dataAgeScript (redis: Redis): Promise<number> {
  return Number(await redis.eval(`${LUA_NOW_MS}
redis.call('SET', KEYS[1], int(now), 'NX')
return now - tonumber(redis.call('GET', KEYS[1]))`, 1, DATA_SINCE_KEY))
}

/** The marker of dataAgeScript. */
export const DATA_SINCE_KEY = 'bff:state:since'

/** The least time without data, commands outstanding, after which a connection is replaced. */
export const SOCKET_TIMEOUT_MS = 5000

/** A command waiting for its answer: when it was sent, and when its bound ends. */
interface Waiting { command: Command, sentAt: number, deadline: number }

/** How often the bound looks at the commands waiting, and the least stall of the loop it forgives (ms). */
const BOUND_TICK_MS = 25

/**
 * The bound on a wait for Redis, counted in time this process could have read the answer. ioredis's
 * commandTimeout is a timer per command, and after a stall of the event loop (a CPU-throttled
 * container, a long synchronous task) Node runs expired timers before it reads sockets: a command
 * whose answer arrived in time, or whose write was still held for the loop's check phase
 * (coalesceWrites), failed, the stores fell back or answered 503, and a keyed cancel's record was
 * written after its request had given up. Here one timer looks at the waiting commands; a tick
 * that comes late by more than a tick is a stall, and each deadline moves by the part of it that
 * its command lived through. It also costs less than a timer set and cleared per command.
 */
export class CommandBound {
  readonly #timeoutMs: number
  readonly #now: () => number
  #waiting: Waiting[] = []
  #timer: NodeJS.Timeout | null = null
  #lastTick = 0

  constructor (timeoutMs: number, now: () => number) {
    this.#timeoutMs = timeoutMs
    this.#now = now
  }

  watch (command: Command): void {
    const at = this.#now()
    this.#waiting.push({ command, sentAt: at, deadline: at + this.#timeoutMs })
    if (this.#timer !== null) return
    this.#lastTick = at
    this.#timer = setInterval(() => { this.#tick() }, BOUND_TICK_MS)
    this.#timer.unref()
  }

  #tick (): void {
    const at = this.#now()
    const stall = at - this.#lastTick - BOUND_TICK_MS
    this.#lastTick = at
    const waiting: Waiting[] = []
    for (const entry of this.#waiting) {
      if (entry.command.isResolved) continue
      // A command sent during the stall (by the task that stalled) or after it is moved by what
      // of the stall it lived through only: none of the stall when sent after it.
      if (stall > BOUND_TICK_MS) entry.deadline += Math.min(stall, at - entry.sentAt)
      if (entry.deadline > at) {
        waiting.push(entry)
        continue
      }
      // A fresh error each: ioredis writes into the errors of a transaction's commands
      // (previousErrors), so one shared instance would carry other requests' errors.
      entry.command.reject(new Error(COMMAND_TIMED_OUT))
    }
    this.#waiting = waiting
    if (waiting.length > 0) return
    clearInterval(this.#timer as NodeJS.Timeout)
    this.#timer = null
  }
}

/** The shared client: every command it sends is bounded by its CommandBound. */
class BoundedRedis extends Redis {
  // Set once super() returns: ioredis sends nothing from its constructor (it connects
  // asynchronously, even without lazyConnect).
  private readonly bound: CommandBound

  constructor (bound: CommandBound, url: string, options: RedisOptions & { replyMapping?: 'legacy' }) {
    super(url, options)
    this.bound = bound
  }

  override sendCommand (command: Command, stream?: Parameters<Redis['sendCommand']>[1]): unknown {
    const sent = super.sendCommand(command, stream)
    this.bound.watch(command)
    return sent
  }
}

const COMMAND_TIMED_OUT = 'Command timed out'

/** A command that got no answer within the shared client's command bound (CommandBound's error, worded as ioredis's). */
export function isCommandTimeout (error: unknown): boolean {
  return error instanceof Error && error.message === COMMAND_TIMED_OUT
}

const corked = new WeakSet<Redis>()

/**
 * Holds `redis`'s writes until the event loop's check phase, so that the commands all the
 * requests in flight send in one turn of the loop leave in one write (writev) instead of one each:
 * under load, most of what a Redis command costs this process is that system call (a cancel
 * sends several). The stores call it before each command; a command waits at most for the rest
 * of the turn. (ioredis's own auto-pipelining flushes on process.nextTick, after each I/O
 * callback, so it joins only the commands of one request, and a pipeline object per flush cost
 * more than it saved.)
 */
export function coalesceWrites (redis: Redis): void {
  if (corked.has(redis) || redis.status !== 'ready') return
  const stream = redis.stream
  stream.cork()
  corked.add(redis)
  setImmediate(function flushRedisWrites () {
    corked.delete(redis)
    stream.uncork()
  })
}
