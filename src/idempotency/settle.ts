import { ErrorCode } from '../errors.js'
import type { StoredAnswer } from './store.js'

/** An answer the route sends: status, envelope, and headers of its own. */
export interface Answer {
  statusCode: number
  body: object
  headers?: Record<string, string>
}

/**
 * Handed to `run`: the route calls the upstream cancel through `attempt.send(...)`, so that a
 * failure of anything before it (the ownership check's Fetch Appointments, the org budget) is
 * known to have sent nothing, while a failure of the cancel itself is judged by its `outcome`.
 */
export interface Attempt {
  /**
   * `endsAt`: the end of the appointment (ms epoch) and `appointment`, its `id` as the upstream
   * lists it, when the route knows them, kept with a key's record for whoever resolves an unknown
   * outcome of this cancel.
   */
  send: <T>(cancel: () => Promise<T>, endsAt?: number | null, appointment?: string | null) => Promise<T>
}

export type Run = (attempt: Attempt) => Promise<Answer>

/** The error shape this module understands: ApiError, and the client's UpstreamError. */
interface CodedError {
  statusCode: number
  code: string
  toEnvelope: () => object
  outcome?: unknown
}

function isCodedError (error: unknown): error is CodedError {
  return error instanceof Error &&
    typeof (error as Partial<CodedError>).statusCode === 'number' &&
    typeof (error as Partial<CodedError>).code === 'string' &&
    typeof (error as Partial<CodedError>).toEnvelope === 'function'
}

/**
 * What becomes of a record after `run`: `store` (an answer to replay), `release` (nothing reached
 * the upstream's cancel: the key is free again), `unknown` (the cancel may have happened; `answer`
 * is what this request tells its client, when it is a coded error).
 */
export type Settlement =
  | { action: 'store', answer: StoredAnswer }
  | { action: 'release' }
  | { action: 'unknown', answer: StoredAnswer | null }

/**
 * An attempt that records whether the cancel was handed over. `beforeSend`, when given, runs first
 * (the keyed path marks its record there): if it fails, the cancel is not sent and the attempt
 * counts as not started.
 */
export function tracked (beforeSend?: (endsAt: number | null, appointment: string | null) => Promise<void>): { attempt: Attempt, sendStarted: () => boolean } {
  let started = false
  function sendNow<T> (cancel: () => Promise<T>): Promise<T> {
    started = true
    return cancel()
  }
  return {
    attempt: {
      send (cancel, endsAt = null, appointment = null) {
        if (beforeSend === undefined) return sendNow(cancel)
        return beforeSend(endsAt, appointment).then(() => sendNow(cancel))
      }
    },
    sendStarted: () => started
  }
}

export function settleAnswer (answer: Answer): Settlement {
  // A 429 is a "not now", not an outcome: pinning it would turn a retry after Retry-After into the
  // same 429 for 24 h.
  if (answer.statusCode === 429) return { action: 'release' }
  return { action: 'store', answer: { statusCode: answer.statusCode, body: answer.body } }
}

export function settleError (error: unknown, sendStarted: boolean): Settlement {
  if (!isCodedError(error)) {
    // Our own bug: harmless before the cancel, but after it the cancel may have happened.
    return sendStarted ? { action: 'unknown', answer: null } : { action: 'release' }
  }
  const answer = { statusCode: error.statusCode, body: error.toEnvelope() }
  if (error.statusCode === 429) return { action: 'release' }
  if (!sendStarted) {
    // The ownership 404 is decided, and the cancel will never be sent for it: replay it.
    // Anything else before the cancel (a failed ownership fetch, our own 503) sent nothing.
    return error.code === ErrorCode.APPOINTMENT_NOT_FOUND ? { action: 'store', answer } : { action: 'release' }
  }
  if (error.outcome === 'not-sent') return { action: 'release' }
  if (error.outcome === 'answered') return { action: 'store', answer }
  // 'unknown', or an error without an outcome raised after the cancel was handed over.
  return { action: 'unknown', answer }
}
