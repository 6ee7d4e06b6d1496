import { setTimeout as sleep } from 'node:timers/promises'
import { ApiError, ErrorCode } from '../errors.js'
import { settleAnswer, settleError, tracked, type Answer, type Run } from './settle.js'
import type { IdempotencyStore } from './store.js'

/** Where store failures are reported; Fastify's logger fits. */
export interface WarnLog {
  warn: (object: object, message: string) => void
}

export interface SingleFlightOptions {
  store: IdempotencyStore
  /** How long a leader may run before followers presume it dead and take over. */
  inFlightTtlMs: number
  /**
   * How long a finished leader's answer stays for followers still polling (ms). Short on purpose:
   * long enough for a poll (every `pollMs`) to see it, so a double tap shares one call, but a
   * patient's deliberate retry a moment later is a new request, not a replay.
   */
  shareTtlMs?: number
  /** The longest a follower on another replica waits before answering 409 (ms). */
  waitMs?: number
  /** How often such a follower looks again (ms). */
  pollMs?: number
  log?: WarnLog
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
   * replicas they poll the store for the leader's answer, up to `waitMs`.
   */
  runOnce: (scope: string, fingerprint: string, run: Run, log?: WarnLog) => Promise<SingleFlightResult>
}

export function inFlightError (retryAfterMs: number, message = 'An identical request is still in progress; retry later'): ApiError {
  return new ApiError(409, ErrorCode.IDEMPOTENCY_IN_FLIGHT, message, {
    headers: { 'Retry-After': String(Math.max(1, Math.ceil(retryAfterMs / 1000))) }
  })
}

export const silentLog: WarnLog = { warn () {} }

export function createSingleFlight (options: SingleFlightOptions): SingleFlight {
  const { store, inFlightTtlMs } = options
  const shareTtlMs = options.shareTtlMs ?? 500
  const waitMs = options.waitMs ?? inFlightTtlMs
  const pollMs = options.pollMs ?? 50
  const defaultLog = options.log ?? silentLog
  const local = new Map<string, Promise<SingleFlightResult>>()

  async function lead (scope: string, key: string, token: string, run: Run, log: WarnLog): Promise<SingleFlightResult> {
    const { attempt, sendStarted } = tracked()
    let answer: Answer
    try {
      answer = await run(attempt)
    } catch (error) {
      // Followers on other replicas get the same answer this request gets, unless nothing reached
      // the upstream: then the marker goes and a waiting follower may try itself.
      const settlement = settleError(error, sendStarted())
      if (settlement.action === 'release' || settlement.answer === null) await quietly(store.release(scope, key, token), log)
      else await quietly(store.complete(scope, key, token, settlement.answer, shareTtlMs), log)
      throw error
    }
    const settlement = settleAnswer(answer)
    if (settlement.action === 'store') await quietly(store.complete(scope, key, token, settlement.answer, shareTtlMs), log)
    else await quietly(store.release(scope, key, token), log)
    return { answer, shared: false }
  }

  async function coordinate (scope: string, fingerprint: string, run: Run, log: WarnLog): Promise<SingleFlightResult> {
    // Its own namespace: a client's Idempotency-Key can never name a single-flight record.
    const key = `flight\0${fingerprint}`
    const deadline = Date.now() + waitMs
    for (;;) {
      let begun
      try {
        begun = await store.begin(scope, key, fingerprint, { ttlMs: inFlightTtlMs, inFlightTtlMs })
      } catch (error) {
        // Without a key the client asked for no retry safety; the shared store only spares the
        // upstream a duplicate from another replica (which the ownership check and the upstream's
        // own state make harmless). Refusing every cancel during a Redis outage would be worse,
        // so proceed with the in-process single flight alone.
        log.warn({ err: errorSummary(error) }, 'idempotency store unavailable: single flight is per process')
        const { attempt } = tracked()
        return { answer: await run(attempt), shared: false }
      }
      if (begun.kind === 'replay') return { answer: { ...begun.answer }, shared: true }
      if (begun.kind === 'in-flight') {
        const left = deadline - Date.now()
        if (left <= 0) throw inFlightError(begun.retryAfterMs)
        await sleep(Math.max(1, Math.min(pollMs, left, begun.retryAfterMs)))
        continue
      }
      /* c8 ignore next 2 -- the key is derived from the fingerprint, so it cannot mismatch */
      if (begun.kind === 'mismatch') throw new Error('single-flight record with another fingerprint')
      // 'started', or 'unknown-outcome' (a leader died): either way this request now leads.
      return await lead(scope, key, begun.token, run, log)
    }
  }

  return {
    async runOnce (scope, fingerprint, run, log = defaultLog) {
      const localKey = `${scope}\0${fingerprint}`
      const pending = local.get(localKey)
      if (pending !== undefined) {
        const result = await pending
        return { answer: result.answer, shared: true }
      }
      const leader = coordinate(scope, fingerprint, run, log)
      local.set(localKey, leader)
      try {
        return await leader
      } finally {
        local.delete(localKey)
      }
    }
  }
}

/** Store writes after the upstream answered never fail the request: the answer is what matters. */
export async function quietly (write: Promise<boolean>, log: WarnLog): Promise<void> {
  try {
    await write
  } catch (error) {
    log.warn({ err: errorSummary(error) }, 'idempotency store write failed')
  }
}

/** Never the key, the scope or the body: the error's own name and message only. */
export function errorSummary (error: unknown): { type: string, message: string } {
  if (error instanceof Error) return { type: error.name, message: error.message }
  return { type: typeof error, message: String(error) }
}
