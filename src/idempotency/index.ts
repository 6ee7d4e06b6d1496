import { hash } from 'node:crypto'
import { ApiError, ErrorCode } from '../errors.js'
import { settleAnswer, settleError, tracked, type Answer, type Run, type Settlement } from './settle.js'
import { createSingleFlight, inFlightError, quietly, silentLog, storeWarnings, type SingleFlightResult } from './single-flight.js'
import type { IdempotencyStore } from './store.js'
import type { Awaitable } from '../state/awaitable.js'
import type { RepeatedWarnings, WarnLog } from '../state/notice.js'

export type { Answer, Attempt, Run } from './settle.js'
export type { WarnLog } from '../state/notice.js'
export { createMemoryIdempotencyStore, createRedisIdempotencyStore, idempotencyStoreFor, IdempotencyStoreError, type IdempotencyStore } from './store.js'

/**
 * Cancels made safe to retry: `Idempotency-Key` replays, mismatches and in-flight answers
 * (draft-ietf-httpapi-idempotency-key-header), unknown outcomes resolved from the upstream's own
 * state, and single flight for identical cancels sent without a key.
 */

export const REPLAY_TTL_MS = 24 * 60 * 60 * 1000
export const REPLAYED_HEADER = 'idempotent-replayed'

/**
 * How long a request may hold its key before it is presumed dead: up to three upstream calls, each
 * bounded by the upstream deadline (resolving an unknown outcome's Fetch Appointments, the
 * ownership check's, the cancel), plus a margin. Shorter would let a retry take over from a
 * request still running and send the cancel twice.
 */
export function inFlightTtlFor (upstreamTimeoutMs: number): number {
  return 3 * upstreamTimeoutMs + 2000
}

// The contract: 1 to 255 visible ASCII characters (RFC 5234 VCHAR), kept as the client sent them.
const KEY_SYNTAX = /^[\x21-\x7e]{1,255}$/

/**
 * The `Idempotency-Key` header, checked before anything else of step 5: the key, undefined when
 * absent, or a 400. A repeated header (an array, or Node's comma-joined text) is refused too.
 */
export function parseIdempotencyKey (value: string | string[] | undefined): string | undefined {
  if (value === undefined) return undefined
  if (typeof value === 'string' && KEY_SYNTAX.test(value)) return value
  throw new ApiError(400, ErrorCode.VALIDATION_FAILED, 'Idempotency-Key must be 1 to 255 visible ASCII characters')
}

/**
 * What makes two cancels the same request: the patient's scope, the appointment (UUIDs compare
 * case-insensitively) and the reason, where an absent reason differs from every present one, the
 * empty string included. One hash over all of it: bound to the scope (itself a keyed hash of the
 * patient), a stored fingerprint cannot be tested against guessed reasons by whoever reads the
 * store.
 */
export function requestFingerprint (scope: string, appointmentId: string, reason: string | undefined): string {
  const reasonPart = reason === undefined ? 'absent' : `present\0${reason}`
  return hash('sha256', `${scope}\0cancel\0${appointmentId.toLowerCase()}\0${reasonPart}`, 'hex')
}

export interface HandleInput {
  /** Opaque patient scope, e.g. a keyed hash of the session's email; never the email itself. */
  scope: string
  /** From `parseIdempotencyKey`. */
  key: string | undefined
  appointmentId: string
  reason: string | undefined
  /** Everything from the ownership check on; the upstream cancel goes through `attempt.send`. */
  run: Run
  /**
   * After an attempt whose outcome is unknown: `cancelled` when the appointment shows as cancelled
   * (answered as confirmed), `send` when nothing shows it is (the cancel is sent, and
   * the upstream's answer is the key's). `endsAt`: the appointment's end as that attempt knew it;
   * `appointment`: its `id` as the upstream listed it to that attempt (null when not known).
   */
  resolveUnknown: (endsAt: number | null, appointment: string | null) => Promise<'cancelled' | 'send'>
  /** The request's logger, for store failures. */
  log?: WarnLog
  /**
   * Called before `handle` rejects with an error that is not this request's own: a key-less
   * cancel that followed an identical one in this process, whose failure it shares (its audit
   * record says `shared`, as a follower's on another replica does, which gets the same answer).
   */
  sharedFailure?: () => void
}

export type EarlierAnswer = 'replayed' | 'confirmed' | 'shared'

export interface HandleResult {
  answer: Answer
  /**
   * Whose answer this is, when not this request's own upstream call: `replayed`, the stored answer
   * of an earlier request with this key (it carries `idempotent-replayed: true`); `confirmed`, the
   * appointment found cancelled after an earlier request with this key whose outcome was unknown
   * (by that request's cancel, or by another's: the upstream's list cannot tell); `shared`, the
   * answer of an identical request under way (single flight). The audit record says so, and a
   * trail counts each cancelled appointment once (README, Operations).
   */
  earlier: EarlierAnswer | null
}

export interface IdempotencyOptions {
  store: IdempotencyStore
  /**
   * False when this process is the only one (no Redis): key-less cancels then meet in its memory
   * without a store call. True by default: other replicas find the leader through `store`.
   */
  replicated?: boolean
  /** See `inFlightTtlFor`. */
  inFlightTtlMs: number
  replayTtlMs?: number
  /** How often a follower of a key-less cancel on another replica polls (see single-flight.ts). */
  pollMs?: number
  log?: WarnLog
  /** Where the store's failures are told (see single-flight.ts); the app's `repeatedWarnings`. */
  warnings?: RepeatedWarnings
  /** True once this process is shutting down (see single-flight.ts). */
  stopping?: () => boolean
}

export interface Idempotency {
  handle: (input: HandleInput) => Promise<HandleResult>
}

const CONFIRMED: Answer = {
  statusCode: 200,
  body: { status: 200, success: true, message: 'Appointment cancelled (confirmed: after an earlier request with this Idempotency-Key, Care360 no longer lists it)' }
}

function storeUnavailable (cause: unknown): ApiError {
  return new ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, 'Cannot check the Idempotency-Key right now; retry later', {
    cause, headers: { 'Retry-After': '2' }
  })
}

/**
 * A store call a keyed cancel cannot go without. Safety first: without the store we cannot tell a
 * retry from a first request, nor leave word that the cancel goes, and proceeding could send a
 * second cancel for a key the client meant to be sent once. A 503 with Retry-After costs the
 * patient a retry; a double cancel cannot be undone.
 */
async function required<T> (call: () => Awaitable<T>): Promise<T> {
  try {
    return await call()
  } catch (error) {
    // Its error line is the 503's (plugins/answers.ts: once a minute while the store is down).
    throw storeUnavailable(error)
  }
}

export function createIdempotency (options: IdempotencyOptions): Idempotency {
  const { store, inFlightTtlMs } = options
  const replayTtlMs = options.replayTtlMs ?? REPLAY_TTL_MS
  const defaultLog = options.log ?? silentLog
  const warnings = options.warnings ?? storeWarnings()
  const singleFlight = createSingleFlight({
    store: options.replicated === false ? null : store,
    inFlightTtlMs,
    pollMs: options.pollMs,
    log: defaultLog,
    warnings,
    stopping: options.stopping
  })

  async function record (scope: string, key: string, token: string, settlement: Settlement, log: WarnLog): Promise<void> {
    if (settlement.action === 'store') await quietly(() => store.complete(scope, key, token, settlement.answer, replayTtlMs), log, warnings)
    else if (settlement.action === 'release') await quietly(() => store.release(scope, key, token), log, warnings)
    else await quietly(() => store.markUnknown(scope, key, token, replayTtlMs), log, warnings)
    // A failed write leaves the record in flight with our token. Once that marker expires, the next
    // retry resolves the outcome from the upstream if the record says the cancel may have gone
    // (markSending, or an earlier unknown outcome), and starts afresh only if nothing was sent:
    // a lost write never leads to a blind re-send.
  }

  /**
   * Just before the cancel goes: the record says it may have been sent, so that a retry taking it
   * over later resolves the outcome instead of sending blind. Until then a takeover starts afresh
   * (nothing was sent). If we no longer hold the key, or cannot say so, the cancel is not sent.
   */
  async function markSending (scope: string, key: string, token: string, endsAt: number | null, appointment: string | null): Promise<void> {
    // The send gets a whole marker's life (more than the gate and one upstream deadline need).
    const marked = await required(() => store.markSending(scope, key, token, inFlightTtlMs, endsAt, appointment))
    // Our in-flight marker expired (a stalled ownership check): a retry may own the key now.
    if (!marked) throw inFlightError(1000, 'The cancel was not sent: this request held its Idempotency-Key too long; retry')
  }

  /**
   * Runs the cancel under our token and records what became of it. `recheck`, when this run
   * resolves an earlier unknown outcome: asked again after the upstream refuses the cancel.
   */
  async function owned (scope: string, key: string, token: string, run: Run, log: WarnLog, recheck?: () => Promise<'cancelled' | 'send'>): Promise<HandleResult> {
    const { attempt, sendStarted } = tracked(async (endsAt, appointment) => { await markSending(scope, key, token, endsAt, appointment) })
    let answer: Answer
    try {
      answer = await run(attempt)
    } catch (error) {
      // The earlier cancel may still have been under way at the upstream when the fresh list
      // showed the appointment: this one, sent after it, is then refused (already cancelled, not
      // found). Gone from the list now, it is that earlier cancel confirmed, not a refusal kept
      // for the key's 24 h.
      if (recheck !== undefined && sendStarted() && isRefusal(error) && await cancelledBy(recheck)) return await confirmed(scope, key, token, log)
      await record(scope, key, token, settleError(error, sendStarted()), log)
      throw error
    }
    await record(scope, key, token, settleAnswer(answer), log)
    return { answer, earlier: null }
  }

  /** The appointment found cancelled after an unknown outcome: recorded, and answered so. */
  async function confirmed (scope: string, key: string, token: string, log: WarnLog): Promise<HandleResult> {
    await quietly(() => store.complete(scope, key, token, CONFIRMED, replayTtlMs), log, warnings)
    return { answer: { statusCode: CONFIRMED.statusCode, body: { ...CONFIRMED.body } }, earlier: 'confirmed' }
  }

  /**
   * An earlier attempt may have cancelled: ask the upstream rather than guess. We hold the token,
   * so a concurrent retry gets 409 and cannot send a second cancel meanwhile.
   */
  async function resolve (scope: string, key: string, token: string, endsAt: number | null, appointment: string | null, input: HandleInput, log: WarnLog): Promise<HandleResult> {
    let state: 'cancelled' | 'send'
    try {
      state = await input.resolveUnknown(endsAt, appointment)
    } catch (error) {
      // Still unknown: keep it so, for the next retry.
      await quietly(() => store.markUnknown(scope, key, token, replayTtlMs), log, warnings)
      throw error
    }
    if (state === 'send') return await owned(scope, key, token, input.run, log, async () => await input.resolveUnknown(endsAt, appointment))
    return await confirmed(scope, key, token, log)
  }

  /** A cancel sent with an Idempotency-Key. */
  async function keyed (input: HandleInput, clientKey: string, fingerprint: string, log: WarnLog): Promise<HandleResult> {
    const { scope } = input
    const key = `key\0${clientKey}`
    const begun = await required(() => store.begin(scope, key, fingerprint, { ttlMs: replayTtlMs, inFlightTtlMs }))
    switch (begun.kind) {
      case 'replay':
        return { answer: { ...begun.answer, headers: { [REPLAYED_HEADER]: 'true' } }, earlier: 'replayed' }
      case 'mismatch':
        throw new ApiError(422, ErrorCode.IDEMPOTENCY_MISMATCH, 'This Idempotency-Key was used with another appointment or reason')
      case 'in-flight':
        throw inFlightError(begun.retryAfterMs, 'A request with this Idempotency-Key is still in progress; retry later')
      case 'started':
        return await owned(scope, key, begun.token, input.run, log)
      default:
        return await resolve(scope, key, begun.token, begun.endsAt, begun.appointment, input, log)
    }
  }

  return {
    handle (input) {
      const log = input.log ?? defaultLog
      const fingerprint = requestFingerprint(input.scope, input.appointmentId, input.reason)
      if (input.key === undefined) return singleFlight.runOnce(input.scope, fingerprint, input.run, log, input.sharedFailure).then(keyless)
      return keyed(input, input.key, fingerprint, log)
    }
  }
}

/**
 * The upstream's refusal of a cancel it answered: its 400, or its NotFoundError (the contract's
 * 404). What the upstream would answer a cancel of an appointment cancelled meanwhile.
 */
function isRefusal (error: unknown): boolean {
  const { outcome, code } = error as { outcome?: unknown, code?: unknown }
  return outcome === 'answered' && (code === ErrorCode.UPSTREAM_REJECTED || code === ErrorCode.APPOINTMENT_NOT_FOUND)
}

/** Whether a fresh look finds the appointment cancelled; a failure of that look says nothing. */
async function cancelledBy (recheck: () => Promise<'cancelled' | 'send'>): Promise<boolean> {
  try {
    return await recheck() === 'cancelled'
  } catch {
    return false
  }
}

function keyless ({ answer, shared }: SingleFlightResult): HandleResult {
  return { answer, earlier: shared ? 'shared' : null }
}
