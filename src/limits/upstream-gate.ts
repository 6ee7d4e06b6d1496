import { ApiError, ErrorCode } from '../errors.js'
import type { BudgetDecision, BudgetStore } from './org-budget.js'
import { clampRetryAfter, type CooldownStore } from './cooldown.js'
import { retryAfterSeconds } from './headers.js'
import { whenReady, type Awaitable } from '../state/awaitable.js'
import { monotonicNow } from '../state/clock.js'

/**
 * What the Care360 client calls around every upstream call (structurally the client's own
 * interface): `acquire` before the call, throwing to stop it; `onRateLimited` when the upstream
 * answered 429 anyway, returning the cooldown decided (ms), which becomes the client's Retry-After.
 */
export interface UpstreamGate {
  /** Returns (or resolves) when the call may go; throws (or rejects) with a 429 when it may not. */
  acquire: (endpoint: 'cancel' | 'list') => Awaitable<void>
  /** Throws the 429 of a cooldown this process holds, at once (the client asks before it waits for a connection). */
  refuseNow: () => void
  onRateLimited: (retryAfterMs: number | null) => Promise<number>
  /**
   * How long this process still holds calls back for a cooldown it has seen (ms, 0 when none):
   * it keeps refusing through a Redis outage that hides the shared cooldown from its store.
   */
  coolingMs: () => number
  /**
   * Writes the cooldown this process still honours back to the shared store, which keeps the later
   * end (CooldownStore.extend): run when the shared state is back after a break (app.ts), since
   * Redis may have come back without it (restarted empty) while the other replicas forgot it or
   * never knew it. Nothing to do when no cooldown runs here. Never rejects (the store falls back).
   */
  restoreCooldown: () => Promise<void>
}

export interface UpstreamGateOptions {
  budget: BudgetStore
  cooldown: CooldownStore
  /** Jitter source in [0, 1); Math.random unless a test fixes it. */
  random?: () => number
  /**
   * The clock of the cooldown this process remembers; monotonicNow unless a test drives it. The
   * stores hand the gate durations, never end times, so it never meets Redis's clock.
   */
  now?: () => number
  /** Hears every decision of `acquire` (metrics): the cooldown's, then the budget's when asked. */
  record?: GateRecorder
  /** Hears the start of each cooldown episode this process saw first (its length, ms): the operator's log. */
  cooldownStarted?: (remainingMs: number) => void
}

export interface GateRecorder {
  decision: (scope: 'cooldown' | 'org_budget', limited: boolean) => void
}

const silent: GateRecorder = { decision () {} }

/**
 * How much longer (ms) than the store's answer this process's own cooldown must run before it
 * counts as lost by the store: both are durations, measured a round trip apart (the command bound,
 * 250 ms by default, unless this process stalled meanwhile: then a cooldown the store kept may be
 * written back needlessly, which only extends it by the stall).
 */
const LOST_COOLDOWN_SLACK_MS = 250

/** How often a replica refusing calls for a cooldown writes it back to the shared store (ms). */
const COOLDOWN_REASSERT_EVERY_MS = 1000

export function upstreamRateLimited (waitMs: number): ApiError {
  return new ApiError(429, ErrorCode.UPSTREAM_RATE_LIMITED, 'The appointment service is busy; try again later', {
    headers: { 'retry-after': retryAfterSeconds(waitMs) }
  })
}

export function createUpstreamGate (options: UpstreamGateOptions): UpstreamGate {
  const { budget, cooldown } = options
  const random = options.random ?? Math.random
  const now = options.now ?? monotonicNow
  const record = options.record ?? silent
  // A cooldown this process has seen is honoured locally until it ends, without asking Redis
  // again, and even if Redis goes away meanwhile. It can only have been extended elsewhere, which
  // the next check after its end finds out.
  let knownUntil = 0
  // When this process last wrote back the cooldown it refuses calls for (see refuseNow).
  let reassertedAt = Number.NEGATIVE_INFINITY

  function remember (remainingMs: number): void {
    knownUntil = Math.max(knownUntil, now() + remainingMs)
  }

  function coolingMs (): number {
    return Math.max(0, knownUntil - now())
  }

  function decided (decision: BudgetDecision): void {
    if (!decision.ok && 'coolingMs' in decision) {
      remember(decision.coolingMs)
      record.decision('cooldown', true)
      throw upstreamRateLimited(decision.coolingMs)
    }
    record.decision('cooldown', false)
    record.decision('org_budget', !decision.ok)
    if (!decision.ok) throw upstreamRateLimited(decision.retryAfterMs)
  }

  function refuseNow (): void {
    const cooling = coolingMs()
    if (cooling > 0) {
      record.decision('cooldown', true)
      // Redis may have lost the cooldown without a break of the connection (FLUSHALL, eviction),
      // which restoreCooldown never hears of: the replicas that did not see the 429 would call the
      // upstream until it answers them 429 too. So a replica refusing calls for a cooldown writes
      // it back (only ever extending: CooldownStore.extend), at most once per
      // COOLDOWN_REASSERT_EVERY_MS; not awaited (it never rejects: a failure is the fallback's to
      // tell, and its memory twin's to hold).
      const at = now()
      if (at - reassertedAt >= COOLDOWN_REASSERT_EVERY_MS) {
        reassertedAt = at
        cooldown.extend(Math.ceil(cooling))
      }
      throw upstreamRateLimited(cooling)
    }
  }

  return {
    refuseNow,

    // Both endpoints draw from one budget: the upstream's quota is per organization.
    acquire () {
      refuseNow()
      // The cooldown first, so that a stopped call does not spend budget: the budget checks it in
      // the same step as its own admission (one Redis round trip for both).
      return whenReady(budget.take(cooldown.check), decided)
    },

    coolingMs,

    async restoreCooldown () {
      const cooling = coolingMs()
      if (cooling > 0) await cooldown.extend(Math.ceil(cooling))
    },

    async onRateLimited (retryAfterMs) {
      const trip = await cooldown.trip(clampRetryAfter(retryAfterMs), random())
      const known = Math.ceil(coolingMs())
      remember(trip.remainingMs)
      if (known > trip.remainingMs + LOST_COOLDOWN_SLACK_MS) {
        // The store lost the cooldown this process still honours (a Redis back empty before it was
        // written back): written back now, and no new episode, however the store saw this 429.
        await cooldown.extend(known)
        return known
      }
      // Once per episode: the calls in flight when the first 429 arrives come back 429 too, and
      // must not halve the budget once each.
      if (trip.fresh) {
        options.cooldownStarted?.(trip.remainingMs)
        await budget.decrease()
      }
      return trip.remainingMs
    }
  }
}
