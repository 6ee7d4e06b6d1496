import { createHmac } from 'node:crypto'
import { ApiError, ErrorCode } from '../../src/errors.js'
import { UpstreamError, type UpstreamOutcome } from '../../src/care360/client.js'
import type { Answer, Attempt, Run } from '../../src/idempotency/index.js'

export const EMAIL = 'pat.patient@example.com'
export const OTHER_EMAIL = 'other.patient@example.com'
export const REASON = 'Feeling much better, thank you'
export const APPOINTMENT = '23ddc211-2a42-4d65-9091-9d9170d0ed62'
export const OTHER_APPOINTMENT = '7a4c2b1e-0f3d-4e8a-9b6c-5d1e2f3a4b5c'

/** The route's scope: a keyed hash of the patient, never the email. */
export function scopeOf (email: string): string {
  return createHmac('sha256', 'test-scope-secret').update(email.toLowerCase()).digest('hex')
}

export const CANCELLED: Answer = { statusCode: 200, body: { status: 200, success: true, message: 'Meeting cancelled successfully' } }

export function upstreamError (outcome: UpstreamOutcome, statusCode = 504, code: ErrorCode = ErrorCode.UPSTREAM_TIMEOUT): UpstreamError {
  return new UpstreamError(statusCode, code, `upstream ${outcome}`, { outcome, upstreamStatus: outcome === 'answered' ? statusCode : null })
}

export const notFound = (): ApiError => new ApiError(404, ErrorCode.APPOINTMENT_NOT_FOUND, 'No such upcoming appointment')

export interface FakeCancel {
  run: Run
  /** Times `run` was entered. */
  runs: () => number
  /** Times the upstream cancel was sent (through attempt.send). */
  sends: () => number
}

interface FakeOptions {
  /** What the upstream cancel does, per call (the last one repeats). */
  cancel?: Array<() => Promise<Answer>>
  /** Something failing before the cancel (the ownership check). */
  before?: () => Promise<void>
  delayMs?: number
}

/** A route's `run`: an optional pre-send step, then the cancel through attempt.send. */
export function fakeCancel (options: FakeOptions = {}): FakeCancel {
  let runs = 0
  let sends = 0
  const steps = options.cancel ?? [async () => CANCELLED]
  return {
    runs: () => runs,
    sends: () => sends,
    async run (attempt: Attempt) {
      runs += 1
      if (options.delayMs !== undefined) await new Promise((resolve) => setTimeout(resolve, options.delayMs))
      await options.before?.()
      const step = steps[Math.min(sends, steps.length - 1)] ?? (async () => CANCELLED)
      return await attempt.send(async () => {
        sends += 1
        return await step()
      })
    }
  }
}

export function deferred<T> (): { promise: Promise<T>, resolve: (value: T) => void } {
  let settle!: (value: T) => void
  const promise = new Promise<T>((resolve) => { settle = resolve })
  return { promise, resolve: settle }
}
