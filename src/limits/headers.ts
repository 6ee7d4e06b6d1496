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

export interface PolicyState {
  policy: PolicyName
  quota: number
  windowMs: number
  remaining: number
  /** Until the window resets (ms). */
  resetMs: number
}

const seconds = (ms: number): number => Math.max(1, Math.ceil(ms / 1000))

export function rateLimitPolicyField (states: readonly PolicyState[]): string {
  return states.map((state) => `"${state.policy}";q=${state.quota};w=${seconds(state.windowMs)}`).join(', ')
}

export function rateLimitField (states: readonly PolicyState[]): string {
  return states.map((state) => `"${state.policy}";r=${Math.max(0, state.remaining)};t=${seconds(state.resetMs)}`).join(', ')
}

/** Retry-After (delay-seconds) for a wait in ms: whole seconds, rounded up, at least 1. */
export function retryAfterSeconds (ms: number): string {
  return String(seconds(ms))
}
