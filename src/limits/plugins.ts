import fp from 'fastify-plugin'
import rateLimit, { normalizeIP, type FastifyRateLimitStore, type FastifyRateLimitStoreCtor } from '@fastify/rate-limit'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Rate } from '../config.js'
import { ErrorCode, errorEnvelope } from '../errors.js'
import { createStoreFallback, type StoreFallback } from './fallback.js'
import { createMemoryCounterStore, createRedisCounterStore, type CounterStore } from './counter-store.js'
import { createOrgBudget } from './org-budget.js'
import { createRedisCooldown } from './cooldown.js'
import { createUpstreamGate, type UpstreamGate } from './upstream-gate.js'
import type { AppMetrics } from '../metrics.js'
import { rateLimitField, rateLimitPolicyField, retryAfterSeconds, type PolicyName, type PolicyState } from './headers.js'

export interface LimitStores {
  fallback: StoreFallback
  counters: CounterStore
}

declare module 'fastify' {
  interface FastifyInstance {
    /** The stores behind every limit of this process (one Redis-or-memory decision point). */
    limitStores: LimitStores
    /** `RATE_LIMIT_CANCEL`: the cancel route adds it to its own `onRequest`. */
    cancelLimit: (request: FastifyRequest, reply: FastifyReply) => Promise<FastifyReply | undefined>
    /** The org budget and the upstream cooldown, for the Care360 client. */
    upstreamGate: UpstreamGate
  }
}

export interface LimitPluginOptions {
  /** Clock of the in-memory stores (tests). */
  now?: () => number
}

type Check = ReturnType<FastifyInstance['createRateLimit']>

/**
 * Adapts our counter store to @fastify/rate-limit's store protocol. `child` returns the same
 * store: the plugin's own children prefix keys with the route (one counter per route), while our
 * keys already carry their scope (`ip:`, `session:`, `cancel:`) and one counter spans all routes.
 */
function pluginStore (counters: CounterStore): FastifyRateLimitStoreCtor {
  return class CounterStoreAdapter implements FastifyRateLimitStore {
    incr (key: string, callback: (error: Error | null, result?: { current: number, ttl: number }) => void, timeWindow: number, max: number): void {
      counters.hit(key, { count: max, windowMs: timeWindow }).then(
        (hit) => { callback(null, { current: hit.count, ttl: hit.resetMs }) },
        (error: Error) => { callback(error) }
      )
    }

    child (): FastifyRateLimitStore {
      return this
    }
  }
}

const applied = new WeakMap<FastifyRequest, PolicyState[]>()

/** The one refusal of every per-client limit; only its Retry-After differs. */
const RATE_LIMITED = Object.freeze(errorEnvelope(429, ErrorCode.RATE_LIMITED, 'Rate limit exceeded'))

/**
 * Counts the request against one policy, publishes every policy applied so far in the two
 * fields, and answers 429 over the limit: true when it did, and the hook then returns the reply
 * to end the request there. Answered directly rather than thrown: under a flood most requests end
 * here, and an Error (its stack trace) and the error handler would be paid for each of them.
 */
async function enforce (request: FastifyRequest, reply: FastifyReply, policy: PolicyName, check: Check, metrics: AppMetrics | null): Promise<boolean> {
  const result = await check(request)
  /* c8 ignore next: only an allowList exempts a request, and none is configured */
  if (result.isAllowed) return false
  metrics?.recordLimiter(policy, result.isExceeded)
  const states = applied.get(request) ?? []
  applied.set(request, states)
  states.push({ policy, quota: result.max, windowMs: result.timeWindow, remaining: result.remaining, resetMs: result.ttl })
  reply.header('ratelimit-policy', rateLimitPolicyField(states))
  reply.header('ratelimit', rateLimitField(states))
  if (!result.isExceeded) return false
  reply.errorCode = ErrorCode.RATE_LIMITED
  reply.code(429).header('retry-after', retryAfterSeconds(result.ttl)).send(RATE_LIMITED)
  return true
}

/** The app's metrics when it has them (tests build apps from parts without). */
function metricsOf (app: FastifyInstance): AppMetrics | null {
  return app.hasDecorator('metrics') ? app.metrics : null
}

function limiter (app: FastifyInstance, rate: Rate, keyOf: (request: FastifyRequest) => string): Check {
  return app.createRateLimit({ max: rate.count, timeWindow: rate.windowMs, keyGenerator: keyOf })
}

/**
 * The key of a session (the hooks call it only when there is one): its id, which is already the
 * SHA-256 of the token, never the token. The hooks test `== null`: undefined too, on an app
 * without the session plugin.
 */
function sessionKey (request: FastifyRequest): string {
  return (request.session as { id: string }).id
}

function ipKey (request: FastifyRequest): string {
  const ip = request.ip as string | undefined
  /* c8 ignore next: a socket that closed before its request was read has no address any more */
  if (ip === undefined) return 'ip:unknown'
  return `ip:${normalizeIP(ip)}`
}

/**
 * `RATE_LIMIT_IP`, on every route and the not-found handler, before authentication. The client
 * IP is `request.ip`: X-Forwarded-For counts only from TRUST_PROXY peers (Fastify's trustProxy).
 * IPv6 clients are keyed by their /64, which a single subscriber usually holds whole.
 *
 * @fastify/rate-limit is used through `createRateLimit` with our store, never through its own
 * hooks: those share one "already ran" flag per request (a second scope would be skipped), count
 * per route, set `x-ratelimit-*` fields, answer 500 with the Redis error text on a store error
 * and wait on a Redis that is down. Our store answers from memory instead of failing.
 */
async function ipLimit (app: FastifyInstance, options: LimitPluginOptions): Promise<void> {
  const fallback = createStoreFallback({ sharedState: app.sharedState, log: app.log, now: options.now })
  const counters = createRedisCounterStore({ fallback, memory: createMemoryCounterStore({ now: options.now }) })
  app.decorate('limitStores', { fallback, counters })
  // skipOnError stays off: our store does not fail on Redis errors, so an error here is a bug,
  // answered as a bare 500 rather than silently lifting the limit.
  await app.register(rateLimit, { global: false, store: pluginStore(counters), skipOnError: false })

  const perIp = limiter(app, app.config.limits.ip, ipKey)
  const metrics = metricsOf(app)
  app.addHook('onRequest', async function limitPerIp (request, reply) {
    if (await enforce(request, reply, 'ip', perIp, metrics)) return reply
  })
}

/**
 * `RATE_LIMIT_SESSION` on every request that carries a session (resolved by the session hook,
 * registered before this one), `RATE_LIMIT_CANCEL` as a hook for the cancel route, and the
 * upstream gate (org budget and cooldown) for the Care360 client.
 */
async function sessionLimit (app: FastifyInstance, options: LimitPluginOptions): Promise<void> {
  const { fallback } = app.limitStores
  const perSession = limiter(app, app.config.limits.session, (request) => `session:${sessionKey(request)}`)
  const perCancel = limiter(app, app.config.limits.cancel, (request) => `cancel:${sessionKey(request)}`)
  const metrics = metricsOf(app)

  app.addHook('onRequest', async function limitPerSession (request, reply) {
    if (request.session == null) return
    if (await enforce(request, reply, 'session', perSession, metrics)) return reply
  })

  app.decorate('cancelLimit', async function limitCancels (request: FastifyRequest, reply: FastifyReply) {
    // Without a session the route answers 401 itself; there is nobody to count against.
    if (request.session == null) return
    if (await enforce(request, reply, 'cancel', perCancel, metrics)) return reply
  })

  const cooldown = createRedisCooldown({ fallback, now: options.now })
  app.decorate('upstreamGate', createUpstreamGate({
    budget: createOrgBudget({ ...app.config.orgBudget, replicas: app.config.replicas, fallback, now: options.now }),
    cooldown,
    now: options.now,
    record: metrics === null ? undefined : { decision: metrics.recordLimiter, budgetRemaining: metrics.setOrgBudgetRemaining }
  }))
  // Read when scraped, through the fallback: Redis's answer when it has one, this process's otherwise.
  metrics?.watchCooldown(cooldown.remaining)
}

export const ipLimitPlugin = fp(ipLimit, { name: 'limits-ip', fastify: '5.x', dependencies: ['answers'] })
export const sessionLimitPlugin = fp(sessionLimit, { name: 'limits-session', fastify: '5.x', dependencies: ['limits-ip'] })
