import type { Rate } from '../config.js'

/**
 * `RateLimit-Policy` and `RateLimit` fields, draft-ietf-httpapi-ratelimit-headers-10 syntax:
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
