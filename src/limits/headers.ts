import type { FastifyReply } from 'fastify'
import type { Rate } from '../config.js'

/**
 * `RateLimit-Policy` and `RateLimit` fields, draft-ietf-httpapi-ratelimit-headers-10 syntax (the
 * same in -11):
 * Structured Field Lists with one Item per policy that applied to the request, the Item a String
 * naming the policy, e.g.
 *
 *   RateLimit-Policy: "ip";q=300;w=60, "session";q=60;w=60
 *   RateLimit: "ip";r=299;t=60, "session";r=12;t=21
 *
 * Names are the scope only. The draft's `pk` (partition key) parameter is never sent: it would
 * disclose the client's IP or a session-derived key, and clients need only the scope.
 */
export type PolicyName = 'ip' | 'session' | 'cancel'

const seconds = (ms: number): number => Math.max(1, Math.ceil(ms / 1000))

/** One policy's item of `RateLimit-Policy`: its quota and window (seconds). */
export function policyItem (policy: PolicyName, rate: Rate): string {
  return `"${policy}";q=${rate.count};w=${seconds(rate.windowMs)}`
}

/** One policy's item of `RateLimit`: what is left (never below 0) and the seconds until the window resets. */
export function rateLimitItem (policy: PolicyName, remaining: number, resetMs: number): string {
  return `"${policy}";r=${Math.max(0, remaining)};t=${seconds(resetMs)}`
}

/** Retry-After (delay-seconds) for a wait in ms: whole seconds, rounded up, at least 1. */
export function retryAfterSeconds (ms: number): string {
  return String(seconds(ms))
}

/**
 * The latest end (ms from now) of a window an answer's `RateLimit` reports spent (`r=0`): a
 * Retry-After on that answer must not be earlier (draft-ietf-httpapi-ratelimit-headers-11,
 * section 6), or a client that obeys it comes back into that policy's 429. Noted only when a
 * policy is spent, read only by answers that carry a Retry-After.
 */
const spentUntil = new WeakMap<FastifyReply, number>()

/** This answer reports a policy spent until `resetMs` from now. */
export function noteSpentWindow (reply: FastifyReply, resetMs: number): void {
  spentUntil.set(reply, Math.max(spentUntil.get(reply) ?? 0, resetMs))
}

/**
 * A 429 or 503 (a per-client limit's, the org budget's, the upstream's cooldown, a store down):
 * its Retry-After raised to the end of any window the answer reports spent.
 */
export function holdRetryAfterPastSpentWindows (reply: FastifyReply): void {
  const spent = spentUntil.get(reply)
  if (spent === undefined) return
  const wait = retryAfterSeconds(spent)
  if (!(Number(reply.getHeader('retry-after')) >= Number(wait))) reply.header('retry-after', wait)
}
