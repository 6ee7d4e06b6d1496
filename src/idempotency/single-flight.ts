import { setTimeout as sleep } from 'node:timers/promises'
import { ApiError, ErrorCode } from '../errors.js'
import { settleAnswer, settleError, tracked, type Answer, type Run } from './settle.js'
import type { BeginResult, IdempotencyStore, StoredAnswer } from './store.js'
import { isPromise, whenReady, type Awaitable } from '../state/awaitable.js'
import { RepeatedWarnings, type WarnLog } from '../state/notice.js'

export interface SingleFlightOptions {
  /**
   * Where followers on other replicas find the leader (Redis). Null when this process is the
   * only one: overlapping cancels then meet in its memory alone, without a store call.
   */
  store: IdempotencyStore | null
  /** How long a leader may run before followers presume it dead and take over. */
  inFlightTtlMs: number
  /**
   * How long a finished leader's answer stays for followers (ms). Short on purpose: long enough
   * for a poll (every `pollMs`) to see it, and for a double tap that comes just after the first
   * answer to share it, but a patient's deliberate retry a moment later is a new request, not a
   * replay. A request that did not overlap the leader shares its answer only when it is a 200 (the
   * double tap gets "cancelled", not a 404 for an appointment the first tap removed); after an
   * error it runs again, as a retry must.
   */
  shareTtlMs?: number
  /** The longest a follower on another replica waits before answering 409 (ms). */
  waitMs?: number
  /** How often such a follower looks again (ms). */
  pollMs?: number
  log?: WarnLog
  /**
   * Where the store's failures are told, once a minute however many cancels meet them (the app's,
   * shared with the keyed cancels'); its own when not given.
   */
  warnings?: RepeatedWarnings
  now?: () => number
  /** True once this process is shutting down (the app's `draining`); never by default. */
  stopping?: () => boolean
}

export interface SingleFlightResult {
  answer: Answer
  /** True when another request's upstream call produced this answer. */
  shared: boolean
}

export interface SingleFlight {
  /**
   * Runs `run` once for every identical request (same scope, same fingerprint) that overlaps it:
   * in this process the followers share the leader's promise (its answer or its error); on other
   * replicas they poll the store for the leader's answer, up to `waitMs`. `sharedFailure` is called
   * when a follower in this process gets its leader's error (the rejection carries the leader's
   * error itself, so it cannot say whose it is).
   */
  runOnce: (scope: string, fingerprint: string, run: Run, log?: WarnLog, sharedFailure?: () => void) => Promise<SingleFlightResult>
}

/**
 * The longest Retry-After of a 409 (ms). The in-flight marker lives for the longest a request can
 * take (three upstream deadlines and a margin: 17 s by default), a bound for a replica that died
 * holding it; the request itself usually answers within a second, and its answer is then replayed.
 */
export const IN_FLIGHT_RETRY_MAX_MS = 2000

export function inFlightError (retryAfterMs: number, message = 'An identical request is still in progress; retry later'): ApiError {
  return new ApiError(409, ErrorCode.IDEMPOTENCY_IN_FLIGHT, message, {
    headers: { 'Retry-After': String(Math.max(1, Math.ceil(Math.min(retryAfterMs, IN_FLIGHT_RETRY_MAX_MS) / 1000))) }
  })
}

export const silentLog: WarnLog = { warn () {} }

/** How often a store failure (a cancel going on without it, a write lost) is told again (ms). */
const STORE_DOWN_WARNING_EVERY_MS = 60_000

/**
 * Finished leaders' answers, each served for `ttlMs` after it was set. Two generations of maps
 * instead of an expiry per entry: entries go in the current one, which becomes the previous one
 * after `ttlMs`, which is dropped whole after another `ttlMs`. No timer and no sweep per entry.
 */
function recentAnswers (ttlMs: number, now: () => number): { get: (key: string) => Answer | undefined, set: (key: string, answer: Answer) => void } {
  let current = new Map<string, { answer: Answer, until: number }>()
  let previous = new Map<string, { answer: Answer, until: number }>()
  let since = now()
  function rotate (at: number): void {
    if (at - since < ttlMs) return
    previous = at - since < 2 * ttlMs ? current : new Map()
    current = new Map()
    since = at
  }
  return {
    get (key) {
      const at = now()
      rotate(at)
      const entry = current.get(key) ?? previous.get(key)
      return entry !== undefined && entry.until > at ? entry.answer : undefined
    },
    set (key, answer) {
      const at = now()
      rotate(at)
      current.set(key, { answer, until: at + ttlMs })
    }
  }
}

export function createSingleFlight (options: SingleFlightOptions): SingleFlight {
  const { store, inFlightTtlMs } = options
  const shareTtlMs = options.shareTtlMs ?? 500
  const waitMs = options.waitMs ?? inFlightTtlMs
  const pollMs = options.pollMs ?? 50
  const defaultLog = options.log ?? silentLog
  const stopping = options.stopping ?? never
  const local = new Map<string, Promise<SingleFlightResult>>()
  const recent = recentAnswers(shareTtlMs, options.now ?? Date.now)
  // Every key-less cancel meets the store: while it is down, once a minute is enough.
  const warnings = options.warnings ?? storeWarnings(options.now)

  /**
   * The leader when this process is the only one: followers that overlap it share its promise; a
   * 200 stays for `shareTtlMs` for a late double tap.
   */
  function leadHere (localKey: string, run: Run): Promise<SingleFlightResult> {
    const { attempt } = tracked()
    const leader = run(attempt).then(function led (answer): SingleFlightResult {
      local.delete(localKey)
      if (answer.statusCode === 200) recent.set(localKey, answer)
      return { answer, shared: false }
    }, function failed (error: unknown): never {
      local.delete(localKey)
      throw error
    })
    local.set(localKey, leader)
    return leader
  }

  /**
   * Runs the cancel as the leader and leaves its answer for followers on other replicas, unless
   * nothing reached the upstream: then the marker goes and a waiting follower may try itself.
   */
  function lead (store: IdempotencyStore, scope: string, key: string, token: string, run: Run, log: WarnLog): Promise<SingleFlightResult> {
    const { attempt, sendStarted } = tracked()
    return run(attempt).then(function led (answer): Awaitable<SingleFlightResult> {
      const settlement = settleAnswer(answer)
      const written = settlement.action === 'store'
        ? quietly(() => store.complete(scope, key, token, settlement.answer, shareTtlMs), log, warnings)
        : quietly(() => store.release(scope, key, token), log, warnings)
      const result = { answer, shared: false }
      return whenReady(written, () => result)
    }, function failed (error: unknown): Promise<never> {
      // Followers on other replicas get the same answer this request gets.
      const settlement = settleError(error, sendStarted())
      const written = settlement.action === 'release' || settlement.answer === null
        ? quietly(() => store.release(scope, key, token), log, warnings)
        : quietly(() => store.complete(scope, key, token, settlement.answer as StoredAnswer, shareTtlMs), log, warnings)
      return Promise.resolve(written).then(() => { throw error })
    })
  }

  /**
   * The lead fell to a follower (its leader on another replica died, or sent nothing) in a process
   * shutting down. Having waited up to a leader's whole lifetime, leading now could outlast the
   * shutdown's deadline, which leaves a request that was running at SIGTERM one lifetime, and cut
   * the cancel off mid-way. Nothing was sent by this request: the record goes back at once and the
   * client is told to retry, which it does on a replica that stays (and leads there).
   */
  function handOver (store: IdempotencyStore, scope: string, key: string, token: string, log: WarnLog): Promise<never> {
    return Promise.resolve(quietly(() => store.release(scope, key, token), log, warnings)).then(() => {
      throw new ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, 'This server is shutting down; retry', { headers: { 'Retry-After': '1' } })
    })
  }

  /**
   * Without a key the client asked for no retry safety; the shared store only spares the upstream
   * a duplicate from another replica (which the ownership check and the upstream's own state make
   * harmless). Refusing every cancel during a Redis outage would be worse, so a store failure
   * leaves the in-process single flight alone.
   */
  function withoutStore (error: unknown, run: Run, log: WarnLog): Promise<SingleFlightResult> {
    warnings.warn(log, { err: errorSummary(error) }, 'idempotency store unavailable: single flight is per process')
    const { attempt } = tracked()
    return run(attempt).then(ownAnswer)
  }

  /**
   * One look at the shared record: a leader's answer, a leader elsewhere to wait for, or the
   * lead. `waited`: this request overlapped that leader (it looked before, and waited).
   */
  function coordinate (store: IdempotencyStore, scope: string, fingerprint: string, run: Run, log: WarnLog, deadline: number, waited: boolean): Awaitable<SingleFlightResult> {
    // Its own namespace: a client's Idempotency-Key can never name a single-flight record.
    const key = `flight\0${fingerprint}`
    function begun (begin: BeginResult): Awaitable<SingleFlightResult> {
      if (begin.kind === 'replay') return { answer: { ...begin.answer }, shared: true }
      if (begin.kind === 'in-flight') return follow(store, scope, fingerprint, begin.retryAfterMs, run, log, deadline)
      /* c8 ignore next 2 -- the key is derived from the fingerprint, so it cannot mismatch */
      if (begin.kind === 'mismatch') throw new Error('single-flight record with another fingerprint')
      // 'started', a dead leader's record included (key-less records are never marked as sending,
      // see store.ts): this request now leads, unless it waited for that leader in a process
      // shutting down.
      if (waited && stopping()) return handOver(store, scope, key, begin.token, log)
      return lead(store, scope, key, begin.token, run, log)
    }
    let begin: Awaitable<BeginResult>
    try {
      // A finished leader's error is shared with the requests that overlapped it (`waited`); one
      // that came after it is a retry, and claims the record to lead it: identical retries on
      // other replicas then follow it instead of each sending its own cancel.
      begin = store.begin(scope, key, fingerprint, { ttlMs: inFlightTtlMs, inFlightTtlMs, retakeFailed: !waited })
    } catch (error) {
      return withoutStore(error, run, log)
    }
    if (isPromise(begin)) return begin.then(begun, (error: unknown) => withoutStore(error, run, log))
    return begun(begin)
  }

  /** A leader on another replica holds the record: look again until its answer is there, or the wait ends. */
  async function follow (store: IdempotencyStore, scope: string, fingerprint: string, retryAfterMs: number, run: Run, log: WarnLog, deadline: number): Promise<SingleFlightResult> {
    const left = deadline - Date.now()
    if (left <= 0) throw inFlightError(retryAfterMs)
    await sleep(Math.max(1, Math.min(pollMs, left, retryAfterMs)))
    return await coordinate(store, scope, fingerprint, run, log, deadline, true)
  }

  return {
    runOnce (scope, fingerprint, run, log = defaultLog, sharedFailure = nothing) {
      const localKey = `${scope}\0${fingerprint}`
      const pending = local.get(localKey)
      if (pending !== undefined) {
        return pending.then(sharedResult, function leaderFailed (error: unknown): never {
          sharedFailure()
          throw error
        })
      }
      if (store === null) {
        const answer = recent.get(localKey)
        return answer === undefined ? leadHere(localKey, run) : Promise.resolve({ answer, shared: true })
      }
      const leader = Promise.resolve(coordinate(store, scope, fingerprint, run, log, Date.now() + waitMs, false))
      local.set(localKey, leader)
      function forget (): void {
        local.delete(localKey)
      }
      leader.then(forget, forget)
      return leader
    }
  }
}

function never (): boolean {
  return false
}

function nothing (): void {}

function ownAnswer (answer: Answer): SingleFlightResult {
  return { answer, shared: false }
}

function sharedResult (result: SingleFlightResult): SingleFlightResult {
  return { answer: result.answer, shared: true }
}

/** The store's failure warnings when the caller gives none: each message once a minute. */
export function storeWarnings (now: () => number = Date.now): RepeatedWarnings {
  return new RepeatedWarnings(STORE_DOWN_WARNING_EVERY_MS, now)
}

/**
 * Store writes after the upstream answered never fail the request: the answer is what matters.
 * A failure is told through `warnings`: during an outage every cancel's write fails, and one line
 * a minute says so (with the count of those left out).
 */
export function quietly (write: () => Awaitable<boolean>, log: WarnLog, warnings: RepeatedWarnings): Awaitable<void> {
  function warn (error: unknown): void {
    const err = errorSummary(error)
    // Told apart by the error's type: a bug (a TypeError) is not hidden behind an outage's line.
    warnings.warn(log, { err }, 'idempotency store write failed', err.type)
  }
  try {
    const written = write()
    if (isPromise(written)) return written.then(() => {}, warn)
  } catch (error) {
    warn(error)
  }
}

/** Never the key, the scope or the body: the error's own name and message only. */
export function errorSummary (error: unknown): { type: string, message: string } {
  if (error instanceof Error) return { type: error.name, message: error.message }
  return { type: typeof error, message: String(error) }
}
