import { randomUUID } from 'node:crypto'
import fp from 'fastify-plugin'
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest, type HookHandlerDoneFunction, type onResponseHookHandler } from 'fastify'
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client'
import type { UpstreamCallOutcome, UpstreamEndpoint } from './care360/client.js'
import { SAFE_EVICTION_POLICY, type SharedStateMode } from './state/redis.js'
import type { Awaitable } from './state/awaitable.js'
import { afterEveryAnswer } from './plugins/after-answer.js'
import { endWithParserRefusal, frameworkRefusal, noRouteMessage, parserErrorStatus, refusalBeforeRouting, requestIdFor, stampHeaders, writeConnectRefused, writeExpectationFailed } from './plugins/answers.js'
import { ErrorCode, errorEnvelope } from './errors.js'
import { listenerOptions, setHeadersTimeout } from './listener.js'

/**
 * Prometheus metrics of one app. Each app owns its registry (never prom-client's global one), so
 * that several apps in one process (tests, benchmarks) keep separate counts. The registry is served
 * by `buildMetricsServer` on METRICS_PORT, never by the public app.
 *
 * Labels are closed vocabularies only (route patterns, status codes, fixed outcome names): never
 * an id, an email, a token or a key, and their number stays bounded whatever clients send.
 */

export type LimiterScope = 'ip' | 'session' | 'cancel' | 'org_budget' | 'cooldown'
export type SignInMethod = 'mobile' | 'web'

type Observer = { observe: (value: number) => void }
type Incrementer = { inc: () => void }

export interface AppMetrics {
  registry: Registry
  httpRequestDuration: Histogram<'method' | 'route' | 'status_code'>
  upstreamDuration: Histogram<'endpoint' | 'outcome'>
  limiterDecisions: Counter<'scope' | 'decision'>
  orgBudgetRemaining: Gauge
  upstreamCooldownActive: Gauge
  signIns: Counter<'method' | 'result'>
  sharedStateMode: Gauge<'mode'>
  redisEvictionPolicySafe: Gauge<'policy'>
  /**
   * A request refused before any route, where no hook sees it (the HTTP parser's refusals,
   * Fastify's malformed URL, an unsupported Expect, a CONNECT): counted by status; it has no route
   * to time. Not one whose body the parser refused once a route was serving it: that one is timed
   * under its route, with the status it was answered.
   */
  recordRefusedBeforeRouting: (status: number) => void
  /** One upstream call, for the Care360 client's `observe` option. */
  observeUpstream: (endpoint: UpstreamEndpoint, outcome: UpstreamCallOutcome, seconds: number) => void
  /** One limiter decision: the request (or upstream call) was let through, or refused. */
  recordLimiter: (scope: LimiterScope, limited: boolean) => void
  /** A finished sign-in: a session was created, or the patient was refused or sent back. */
  recordSignIn: (method: SignInMethod, success: boolean) => void
  /** How to read the upstream cooldown (ms left) when scraped; set by the limits plugin. */
  watchCooldown: (remainingMs: () => Awaitable<number>) => void
  /** How to read what the org budget has left in its window when scraped; set by the limits plugin. */
  watchBudget: (remaining: () => Awaitable<number>) => void
}

declare module 'fastify' {
  interface FastifyInstance {
    metrics: AppMetrics
  }
}

// In seconds. Our own work is sub-millisecond; the tail covers slow upstream calls behind a route.
const HTTP_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
const UPSTREAM_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
const SCOPES: readonly LimiterScope[] = ['ip', 'session', 'cancel', 'org_budget', 'cooldown']
const MODES: readonly SharedStateMode[] = ['redis', 'degraded', 'memory']
const ENDPOINTS: readonly UpstreamEndpoint[] = ['cancel', 'list']
// Every outcome the client reports (a Record, so that a new one must be added here).
const OUTCOMES = Object.keys({ ok: 0, rejected: 0, auth_failed: 0, rate_limited: 0, error: 0, unavailable: 0, timeout: 0 } satisfies Record<UpstreamCallOutcome, 0>) as UpstreamCallOutcome[]
// The statuses of the refusals before routing: the HTTP parser's (parserErrorStatus: a request
// whose headers never parsed, or one no route takes), a malformed URL or a CONNECT, an unsupported
// Expect.
const REFUSED_STATUSES = [400, 408, 417, 431] as const
const NOT_FOUND = 'not_found'

/**
 * `readMode`: the shared state's mode; `readEvictionPolicy`: Redis's maxmemory-policy, null while
 * unknown (no Redis, not read yet, INFO refused).
 */
export function createAppMetrics (readMode: (() => SharedStateMode) | null, readEvictionPolicy: (() => string | null) | null = null): AppMetrics {
  const registry = new Registry()
  collectDefaultMetrics({ register: registry })

  const httpRequestDuration = new Histogram({
    name: 'http_request_duration_seconds',
    help: 'Time from request start to the answer sent, by route pattern (not_found when none matched) and status',
    labelNames: ['method', 'route', 'status_code'] as const,
    buckets: HTTP_BUCKETS,
    registers: [registry]
  })
  const upstreamDuration = new Histogram({
    name: 'care360_upstream_duration_seconds',
    help: 'Care360 calls past the org budget and cooldown, by endpoint and outcome (timeout includes calls that got no connection in time and were never sent)',
    labelNames: ['endpoint', 'outcome'] as const,
    buckets: UPSTREAM_BUCKETS,
    registers: [registry]
  })
  // A request passes seven limiter decisions or more (a cancel whose ownership list is looked up:
  // ip, session, cancel, then cooldown and budget for each upstream call, a list call sent again
  // after a lost connection included): they are counted in plain numbers and
  // handed to the counter when scraped, instead of a prom-client call (a label hash) each.
  const decisions = new Map(SCOPES.map((scope) => [scope, { allowed: 0, limited: 0, published: { allowed: 0, limited: 0 } }]))
  const limiterDecisions = new Counter({
    name: 'bff_limiter_decisions_total',
    help: 'Limiter decisions by scope: per-IP, per-session and cancel limits on requests, org budget and cooldown on upstream calls',
    labelNames: ['scope', 'decision'] as const,
    registers: [registry],
    collect () {
      for (const [scope, count] of decisions) {
        for (const decision of ['allowed', 'limited'] as const) {
          const fresh = count[decision] - count.published[decision]
          if (fresh > 0) this.inc({ scope, decision }, fresh)
          count.published[decision] = count[decision]
        }
      }
    }
  })
  let budgetRemaining: (() => Awaitable<number>) | null = null
  const orgBudgetRemaining = new Gauge({
    name: 'bff_org_budget_remaining',
    help: 'Upstream calls the org budget has left in its window (read when scraped: the shared count from Redis, this process\'s share while it counts alone)',
    registers: [registry],
    async collect () {
      if (budgetRemaining !== null) this.set(await budgetRemaining())
    }
  })
  let cooldownRemaining: (() => Awaitable<number>) | null = null
  const upstreamCooldownActive = new Gauge({
    name: 'bff_upstream_cooldown_active',
    help: '1 while upstream calls are stopped after a Care360 429, else 0 (read when scraped)',
    registers: [registry],
    async collect () {
      this.set(cooldownRemaining !== null && await cooldownRemaining() > 0 ? 1 : 0)
    }
  })
  const signIns = new Counter({
    name: 'bff_signins_total',
    help: 'Finished sign-ins by method (mobile: POST /auth/session; web: the OIDC callback) and result',
    labelNames: ['method', 'result'] as const,
    registers: [registry]
  })
  const refusedBeforeRouting = new Counter({
    name: 'bff_http_refused_before_routing_total',
    help: 'Requests refused before any route (malformed request or URL, headers too large or too slow to arrive, an unsupported Expect, a CONNECT, a body the HTTP parser refused in a request no route takes), by the status answered; a routed request whose body the parser refused is in http_request_duration_seconds under its route instead',
    labelNames: ['status_code'] as const,
    registers: [registry]
  })
  const sharedStateMode = new Gauge({
    name: 'bff_shared_state_mode',
    help: 'Where shared state lives now: 1 for the current mode (redis, degraded = Redis configured but unreachable or failing its commands, memory = no Redis)',
    labelNames: ['mode'] as const,
    registers: [registry],
    collect () {
      const current = readMode === null ? null : readMode()
      for (const mode of MODES) this.set({ mode }, mode === current ? 1 : 0)
    }
  })
  const redisEvictionPolicySafe = new Gauge({
    name: 'bff_redis_eviction_policy_safe',
    help: 'Redis\'s maxmemory-policy as last read (at each connection and every 5 minutes): 1 for noeviction, 0 for a policy that may evict the service\'s state (sessions, Idempotency-Key records, limits); no sample while unknown (no Redis, or INFO refused)',
    labelNames: ['policy'] as const,
    registers: [registry],
    collect () {
      const policy = readEvictionPolicy === null ? null : readEvictionPolicy()
      this.reset()
      // The label is the policy's name as Redis gave it (shared-state reads it as [a-z0-9-]{1,64}).
      if (policy !== null) this.set({ policy }, policy === SAFE_EVICTION_POLICY ? 1 : 0)
    }
  })

  // Children made once: the hot path increments without building or hashing label sets. Each
  // starts at 0 in the scrape, so that rate() and alerts see a series before its first event (the
  // upstream outcomes and the refusals before routing too: closed vocabularies).
  const counterChild = <T extends string>(counter: Counter<T>, labels: Partial<Record<T, string>>): Incrementer => {
    counter.inc(labels, 0)
    return counter.labels(labels)
  }
  const upstreamChildren = new Map<string, Observer>()
  for (const endpoint of ENDPOINTS) {
    for (const outcome of OUTCOMES) {
      upstreamDuration.zero({ endpoint, outcome })
      upstreamChildren.set(`${endpoint}:${outcome}`, upstreamDuration.labels(endpoint, outcome))
    }
  }
  for (const status of REFUSED_STATUSES) refusedBeforeRouting.inc({ status_code: String(status) }, 0)
  for (const scope of SCOPES) {
    limiterDecisions.inc({ scope, decision: 'allowed' }, 0)
    limiterDecisions.inc({ scope, decision: 'limited' }, 0)
  }
  const signInChildren = {
    mobile: [counterChild(signIns, { method: 'mobile', result: 'failure' }), counterChild(signIns, { method: 'mobile', result: 'success' })],
    web: [counterChild(signIns, { method: 'web', result: 'failure' }), counterChild(signIns, { method: 'web', result: 'success' })]
  } as const

  return {
    registry,
    httpRequestDuration,
    upstreamDuration,
    limiterDecisions,
    orgBudgetRemaining,
    upstreamCooldownActive,
    signIns,
    sharedStateMode,
    redisEvictionPolicySafe,
    recordRefusedBeforeRouting (status) {
      refusedBeforeRouting.labels(String(status)).inc()
    },
    observeUpstream (endpoint, outcome, seconds) {
      // Every endpoint and outcome has its child from the start (above).
      ;(upstreamChildren.get(`${endpoint}:${outcome}`) as Observer).observe(seconds)
    },
    recordLimiter (scope, limited) {
      const count = decisions.get(scope) as { allowed: number, limited: number }
      if (limited) count.limited += 1
      else count.allowed += 1
    },
    recordSignIn (method, success) {
      signInChildren[method][success ? 1 : 0].inc()
    },
    watchCooldown (remainingMs) {
      cooldownRemaining = remainingMs
    },
    watchBudget (remaining) {
      budgetRemaining = remaining
    }
  }
}

/**
 * Request durations by route, status code and method, with the children of each route cached in
 * its own hook: per request, one map lookup by method and one by status, then an observe.
 */
function durationRecorder (histogram: AppMetrics['httpRequestDuration'], route: string): onResponseHookHandler {
  const byMethod = new Map<string, Map<number, Observer>>()
  function recordDuration (request: FastifyRequest, reply: FastifyReply, done: HookHandlerDoneFunction): void {
    const status = reply.statusCode
    let byStatus = byMethod.get(request.method)
    if (byStatus === undefined) {
      byStatus = new Map()
      byMethod.set(request.method, byStatus)
    }
    let child = byStatus.get(status)
    if (child === undefined) {
      child = histogram.labels(request.method, route, String(status))
      byStatus.set(status, child)
    }
    child.observe(reply.elapsedTime / 1000)
    done()
  }
  return recordDuration
}

async function metrics (app: FastifyInstance): Promise<void> {
  const state = app.hasDecorator('sharedState') ? app.sharedState : null
  const appMetrics = createAppMetrics(state === null ? null : () => state.mode(), state?.evictionPolicy ?? null)
  app.decorate('metrics', appMetrics)

  // Labelled with the route's pattern, or one label for whatever path no route matched.
  afterEveryAnswer(app, (route) => durationRecorder(appMetrics.httpRequestDuration, route), durationRecorder(appMetrics.httpRequestDuration, NOT_FOUND))
}

export const metricsPlugin = fp(metrics, { name: 'metrics', fastify: '5.x' })

/** How long a metrics connection may stay silent with a request in it. */
const METRICS_IDLE_MS = 30_000

/**
 * The Prometheus listener: a separate, un-listened Fastify instance with `GET /metrics` and
 * nothing else, so that the registry is reachable on METRICS_PORT only (server.ts listens it).
 */
export function buildMetricsServer (registry: Registry): FastifyInstance {
  // The public port's request ids and envelope here too (the contract's "every answer").
  const server = Fastify({
    logger: false,
    forceCloseConnections: true,
    // The public listener's cut-offs for slow clients (a scrape is answered in milliseconds), and
    // no body worth reading: nothing here takes one.
    ...listenerOptions(METRICS_IDLE_MS),
    bodyLimit: 1024,
    genReqId: requestIdFor,
    // Refused before routing (a malformed URL), and by the HTTP parser: the same envelope.
    frameworkErrors: frameworkRefusal,
    clientErrorHandler (error: NodeJS.ErrnoException, socket) {
      // A client gone before its answer: nothing to write. Its moment cannot be timed from a test
      // (the public listener's same check is reached by test/abuse/sockets.test.ts).
      /* c8 ignore next 4 */
      if (!socket.writable) {
        socket.destroy()
        return
      }
      endWithParserRefusal(socket, parserErrorStatus(error), randomUUID())
    }
  })
  setHeadersTimeout(server.server)
  server.server.on('checkExpectation', (request, response) => { writeExpectationFailed(request, response) })
  server.server.on('connect', (request, socket) => { writeConnectRefused(request, socket) })
  server.addHook('onRequest', function stamp (request, reply, done) {
    stampHeaders(request, reply)
    // The public listener's refusals of faulty framing and Host (answers.ts), here too: a proxy in
    // front of this port must not read another request than this one.
    const refusal = refusalBeforeRouting(request)
    if (refusal !== null) {
      reply.headers(refusal.headers).code(refusal.statusCode).send(refusal.toEnvelope())
      return
    }
    done()
  })
  server.get('/metrics', async function scrape (_request, reply) {
    const body = await registry.metrics()
    return reply.header('content-type', registry.contentType).send(body)
  })
  function notFound (request: FastifyRequest, reply: FastifyReply): FastifyReply {
    return reply.code(404).send(errorEnvelope(404, ErrorCode.NOT_FOUND, `${noRouteMessage(request)}; metrics are at GET /metrics`))
  }
  server.setNotFoundHandler(notFound)
  // On no route, whatever went wrong with the request (a malformed or oversized body, parsed
  // before the not-found handler runs), it is the 404 above; on GET /metrics, a collector that
  // failed: no detail to the scraper.
  server.setErrorHandler(function failed (_error, request, reply) {
    if (request.is404) return notFound(request, reply)
    return reply.code(500).send(errorEnvelope(500, ErrorCode.INTERNAL_ERROR, 'Internal Server Error'))
  })
  return server
}
