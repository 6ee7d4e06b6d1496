import { isIPv4 } from 'node:net'
import { Address6 } from 'ip-address'
import { compile as compileTrust } from '@fastify/proxy-addr'
import fp from 'fastify-plugin'
import type { FastifyInstance, FastifyReply, FastifyRequest, HookHandlerDoneFunction, onRequestHookHandler, onSendHookHandler, RouteOptions } from 'fastify'
import type { Rate } from '../config.js'
import { ErrorCode, errorEnvelope } from '../errors.js'
import { isPromise, whenReady } from '../state/awaitable.js'
import { createStoreFallback, type StoreFallback } from './fallback.js'
import { createCounterStore, type CounterHit, type CounterStore } from './counter-store.js'
import { createOrgBudget } from './org-budget.js'
import { createCooldown } from './cooldown.js'
import { createUpstreamGate, type UpstreamGate } from './upstream-gate.js'
import type { AppMetrics } from '../metrics.js'
import { pathOf } from '../logging.js'
import { appendHook } from '../plugins/after-answer.js'
import { holdRetryAfterPastSpentWindows, noteSpentWindow, policyItem, rateLimitItem, retryAfterSeconds, type PolicyName } from './headers.js'

declare module 'fastify' {
  interface FastifyInstance {
    /**
     * The one Redis-or-memory decision point of every limit store of this process, shared by the
     * limit plugins (a session's counters are its lookup's: auth/session-store.ts).
     */
    limitsFallback: StoreFallback
    /** The org budget and the upstream cooldown, for the Care360 client. */
    upstreamGate: UpstreamGate
  }
  interface FastifyContextConfig {
    /**
     * `refusals`: `RATE_LIMIT_IP` counts only this route's 4xx answers, on a counter of their own
     * per address (a route whose valid requests must all get through: a server-to-server peer's
     * back-channel logout, a patient's sign-out). An address whose refusals reached the limit is
     * refused before the route runs until its window ends.
     */
    ipLimit?: 'refusals'
  }
}

export interface LimitPluginOptions {
  /** Clock of the in-memory stores (tests). */
  now?: () => number
}

/** The one refusal of every per-client limit; only its Retry-After differs. */
const RATE_LIMITED = Object.freeze(errorEnvelope(429, ErrorCode.RATE_LIMITED, 'Rate limit exceeded'))

/** One per-client limit: its scope, its rate, the policy item it publishes. */
interface ClientLimit {
  policy: PolicyName
  rate: Rate
  /** `"ip";q=300;w=60`: the same for every request. */
  policyItem: string
}

function clientLimit (policy: PolicyName, rate: Rate): ClientLimit {
  return { policy, rate, policyItem: policyItem(policy, rate) }
}

/**
 * Publishes this limit beside those applied before it (the fields list every policy that applied
 * to the request, in order). Answers whether the hit is over the limit.
 */
function publish (limit: ClientLimit, hit: CounterHit, reply: FastifyReply, metrics: AppMetrics | null): boolean {
  const exceeded = hit.count > limit.rate.count
  metrics?.recordLimiter(limit.policy, exceeded)
  if (hit.count >= limit.rate.count) noteSpentWindow(reply, hit.resetMs)
  const item = rateLimitItem(limit.policy, limit.rate.count - hit.count, hit.resetMs)
  const policies = reply.getHeader('ratelimit-policy')
  if (policies === undefined) {
    reply.header('ratelimit-policy', limit.policyItem)
    reply.header('ratelimit', item)
  } else {
    reply.header('ratelimit-policy', `${String(policies)}, ${limit.policyItem}`)
    reply.header('ratelimit', `${String(reply.getHeader('ratelimit'))}, ${item}`)
  }
  return exceeded
}

/**
 * The 429 of every per-client limit. Answered directly rather than thrown: under a flood most
 * requests end here, and an Error (its stack trace) and the error handler would be paid for each.
 */
function refuse (hit: CounterHit, reply: FastifyReply): void {
  reply.errorCode = ErrorCode.RATE_LIMITED
  reply.code(429).header('retry-after', retryAfterSeconds(hit.resetMs))
  // Another policy this answer reports spent may end later than the one refusing.
  holdRetryAfterPastSpentWindows(reply)
  reply.send(RATE_LIMITED)
}

/** The limits' verdicts in order: the request goes on, or the first limit it is over refuses it. */
function decide (limits: readonly ClientLimit[], hits: readonly CounterHit[], reply: FastifyReply, metrics: AppMetrics | null, done: HookHandlerDoneFunction): void {
  for (let i = 0; i < hits.length; i++) {
    const hit = hits[i] as CounterHit
    if (publish(limits[i] as ClientLimit, hit, reply, metrics)) {
      refuse(hit, reply)
      return
    }
  }
  done()
}

/**
 * The orchestrator's probes are neither counted nor refused: they share an address with traffic
 * (a node's address behind SNAT, a load balancer without TRUST_PROXY), and a liveness probe
 * answered 429 restarts a healthy replica. They cost no upstream call and no store lookup.
 */
export const PROBES: ReadonlySet<string> = new Set(['/healthz', '/readyz'])

/**
 * The per-IP hook: synchronous when the counters are in memory, waiting for Redis otherwise. A
 * counter store never fails (it falls back to memory), so a rejection here is a bug, answered as
 * a bare 500 rather than silently lifting the limit. A request to a refusals-only route (when the
 * app has one, `refusalsOnly`) counts nothing here: it is refused if its address's refusals have
 * reached the limit, and the route's `countRefusal` hook counts it as its answer goes if that is a
 * refusal.
 */
function ipLimitHook (counters: CounterStore, limit: ClientLimit, metrics: AppMetrics | null, refusalsOnly: { routes: boolean }): onRequestHookHandler {
  const limits = [limit]
  return function limitRequest (request, reply, done) {
    // The probe routes only (GET, HEAD): a POST to their path is any other unknown route's 404.
    if (PROBES.has(pathOf(request.url)) && !request.is404) {
      done()
      return
    }
    // By the route the router matched, whatever spelling of its path reached it (`%2D` included).
    if (refusalsOnly.routes && request.routeOptions.config.ipLimit === 'refusals') {
      judgedOnRefusals.add(request)
      const refusals = counters.peek(refusalsKey(request))
      if (isPromise(refusals)) {
        refusals.then((counted) => { decideOnRefusals(limit, counted, reply, metrics, done) }, done)
        return
      }
      decideOnRefusals(limit, refusals, reply, metrics, done)
      return
    }
    const hit = counters.hit(ipKey(request), limit.rate)
    if (isPromise(hit)) {
      hit.then((counted) => { decide(limits, [counted], reply, metrics, done) }, done)
      return
    }
    decide(limits, [hit], reply, metrics, done)
  }
}

/**
 * The refusals of an address on the refusals-only routes have a counter of their own: the address's
 * other traffic (a provider's servers behind one NAT with other clients) never blocks its valid
 * requests there, and its refused ones there do not use up its quota elsewhere.
 */
function refusalsKey (request: FastifyRequest): string {
  return `refused-${ipKey(request)}`
}

/** The requests the per-IP hook judged on their address's refusals: their route counts them if refused. */
const judgedOnRefusals = new WeakSet<FastifyRequest>()

/**
 * The limit of a refusals-only route: the request goes on while the address's refusals are below
 * the limit (what is left is published as on every route), and is refused once they reach it.
 * Valid requests are never counted, so an identity provider's logouts arriving together all get
 * through; the price is that refused ones arriving together are all verified before their count
 * refuses the next (README, Known limits).
 */
function decideOnRefusals (limit: ClientLimit, refusals: CounterHit | null, reply: FastifyReply, metrics: AppMetrics | null, done: HookHandlerDoneFunction): void {
  const counted = refusals ?? { count: 0, resetMs: limit.rate.windowMs }
  // As if this request were one more refusal: refused when that would be over the limit.
  if (publish(limit, { count: counted.count + 1, resetMs: counted.resetMs }, reply, metrics)) {
    refuse(counted, reply)
    return
  }
  done()
}

/**
 * A refusals-only route's hook as its answer goes: a refusal (a 4xx, not the limit's own 429)
 * counts against the address, before the client has it, so that its next request is judged with
 * it.
 */
function countRefusal (counters: CounterStore, limit: ClientLimit): onSendHookHandler {
  return function countIfRefused (request, reply, payload, done) {
    const status = reply.statusCode
    if (!judgedOnRefusals.has(request) || status < 400 || status >= 500 || status === 429) {
      done(null, payload)
      return
    }
    const hit = counters.hit(refusalsKey(request), limit.rate)
    if (isPromise(hit)) {
      hit.then(() => { done(null, payload) }, done)
      return
    }
    done(null, payload)
  }
}

/**
 * The per-session limit, and on a route with `cancelLimit` the per-cancel limit after it. The
 * session lookup counted them (auth/plugin.ts: one Redis round trip for the session and its
 * limits; the cancel counter is not counted when the session limit refuses, as if its check came
 * after); this hook publishes them and refuses, after the CSRF check. Its hits are in that order,
 * so the i-th hit is the i-th of these limits: the lookup decided which of them a route counts.
 * Requests without a session count nothing (the routes that need one answer 401 themselves).
 */
function sessionLimitHook (session: ClientLimit, cancel: ClientLimit, metrics: AppMetrics | null): onRequestHookHandler {
  const inOrder = [session, cancel]
  return function limitSession (request, reply, done) {
    const hits = request.sessionHits
    if (hits === null) {
      done()
      return
    }
    decide(inOrder, hits, reply, metrics, done)
  }
}

/** The app's metrics when it has them (tests build apps from parts without). */
function metricsOf (app: FastifyInstance): AppMetrics | null {
  return app.hasDecorator('metrics') ? app.metrics : null
}

/**
 * A client address as its counter knows it: IPv4 as it is (also when it arrives IPv4-mapped on a
 * dual-stack socket), IPv6 by its /64, which a single subscriber usually holds whole, so that
 * one client cannot rotate through its own prefix to escape the limit.
 */
export function clientAddress (ip: string): string {
  if (!ip.includes(':')) return ip
  // An X-Forwarded-For entry with the client's port (Azure Application Gateway writes
  // `203.0.113.7:51234` and `[2001:db8::1]:51234`): one client, whatever connection it used.
  const address = withoutPort(ip)
  if (!address.includes(':')) return address
  // Node's own spelling of an IPv4 client on a dual-stack socket, at once.
  if (address.startsWith('::ffff:') && isIPv4(address.slice(7))) return address.slice(7)
  try {
    const parsed = new Address6(`${address}/64`)
    // Any other spelling of an IPv4-mapped address (a proxy's: upper case, expanded, the IPv4
    // part in hex) is that IPv4 client too, not the ::/64 all of them would share.
    if (parsed.isMapped4()) return parsed.to4().correctForm()
    return parsed.startAddress().correctForm()
  } catch {
    // Not an address: X-Forwarded-For text from a TRUST_PROXY peer, which nobody parsed. It is
    // still one client's key.
    return address.toLowerCase()
  }
}

const IPV4_WITH_PORT = /^(\d{1,3}(?:\.\d{1,3}){3}):\d{1,5}$/
const BRACKETED_IPV6 = /^\[([0-9A-Fa-f:.]+)\](?::\d{1,5})?$/

/** An X-Forwarded-For entry's address without the port it may be written with. */
function withoutPort (entry: string): string {
  return IPV4_WITH_PORT.exec(entry)?.[1] ?? BRACKETED_IPV6.exec(entry)?.[1] ?? entry
}

/**
 * Fastify's `trustProxy` for TRUST_PROXY (false when it lists nothing): an X-Forwarded-For hop is
 * trusted when its address is in the list, written with a port or not. Azure Application Gateway
 * appends `ip:port`; behind another proxy, the entry it appends is that proxy's own, and read
 * whole (proxy-addr takes no port) it was no address in the list: the proxy was taken for the
 * client, and every client behind it shared one per-IP counter.
 */
export function proxyTrust (list: string[]): ((address: string, hop: number) => boolean) | false {
  if (list.length === 0) return false
  const trusted = compileTrust(list)
  return function trustedHop (address, hop) {
    return trusted(withoutPort(address), hop)
  }
}

function ipKey (request: FastifyRequest): string {
  const ip = request.ip as string | undefined
  /* c8 ignore next: a socket that closed before its request was read has no address any more */
  if (ip === undefined) return 'ip:unknown'
  return `ip:${clientAddress(ip)}`
}

/**
 * `RATE_LIMIT_IP`, on every route and the not-found handler, before authentication. The client
 * IP is `request.ip`: X-Forwarded-For counts only from TRUST_PROXY peers (Fastify's trustProxy).
 *
 * The counters are ours rather than @fastify/rate-limit's: the contract needs three scopes in its
 * own order (per IP before authentication, per session and per cancel after it), one counter per
 * scope across all routes, draft-10 fields instead of `x-ratelimit-*`, and a store that falls back
 * to memory instead of failing or waiting on a Redis that is down. The plugin's hooks share one
 * "already ran" flag per request and count per route, so it was used only as a wrapper around our
 * store, and that wrapper is asynchronous: promises and a callback adapter per scope on every
 * request. These hooks are synchronous on the memory store (with the other synchronous stores,
 * 0.83 x the CPU per cancel side by side, BENCHMARKS.md).
 */
async function ipLimit (app: FastifyInstance, options: LimitPluginOptions): Promise<void> {
  const fallback = createStoreFallback({ sharedState: app.sharedState, log: app.log, now: options.now })
  const counters = createCounterStore({ fallback, now: options.now })
  const limit = clientLimit('ip', app.config.limits.ip)
  // Whether a refusals-only route exists: known once every route is added, read per request.
  const refusalsOnly = { routes: false }
  app.decorate('limitsFallback', fallback)
  app.addHook('onRoute', function countRefusalsOnly (route: RouteOptions) {
    if (route.config?.ipLimit !== 'refusals') return
    refusalsOnly.routes = true
    route.onSend = appendHook(route.onSend, countRefusal(counters, limit))
  })
  app.addHook('onRequest', ipLimitHook(counters, limit, metricsOf(app), refusalsOnly))
}

/**
 * `RATE_LIMIT_SESSION` on every request that carries a session, `RATE_LIMIT_CANCEL` after it on
 * routes with `cancelLimit` (both counted by the session hook, registered before this one, and
 * enforced here), and the upstream gate (org budget and cooldown) for the Care360 client.
 */
async function sessionLimit (app: FastifyInstance, options: LimitPluginOptions): Promise<void> {
  const fallback = app.limitsFallback
  const { limits } = app.config
  const metrics = metricsOf(app)
  app.addHook('onRequest', sessionLimitHook(clientLimit('session', limits.session), clientLimit('cancel', limits.cancel), metrics))

  const cooldown = createCooldown({ fallback, now: options.now })
  const budget = createOrgBudget({ ...app.config.orgBudget, replicas: app.config.replicas, fallback, now: options.now })
  if (!fallback.redisConfigured && app.config.replicas > 1) {
    // The contract's in-memory mode is one process; a REPLICAS above 1 says otherwise. The budget
    // stays split, which never lets the upstream see more than its count whichever is true.
    app.log.warn({ replicas: app.config.replicas }, 'REPLICAS above 1 without REDIS_URL: this process holds its share of the org budget only, as if Redis were unreachable (set REPLICAS=1 for one in-memory process)')
  }
  const gate = createUpstreamGate({
    budget,
    cooldown,
    now: options.now,
    record: metrics === null ? undefined : { decision: metrics.recordLimiter },
    // Once per episode, on the replica whose 429 began it: every replica holds back meanwhile.
    cooldownStarted: (remainingMs) => { app.log.warn({ cooldownMs: remainingMs }, 'Care360 answered 429: upstream calls held back for the cooldown, and the org budget halved') }
  })
  app.decorate('upstreamGate', gate)
  // Read when scraped, through the fallback: Redis's answer when it has one, this process's
  // otherwise; and never less than the cooldown this process is still honouring (a Redis outage
  // hides the shared one from the fallback, while the gate goes on refusing).
  metrics?.watchCooldown(() => whenReady(cooldown.remaining(), (remainingMs) => Math.max(remainingMs, gate.coolingMs())))
  // Read when scraped too, so that the gauge refills as the window slides while no call is made.
  metrics?.watchBudget(budget.remaining)
}

export const ipLimitPlugin = fp(ipLimit, { name: 'limits-ip', fastify: '5.x', dependencies: ['answers'] })
// After the CSRF hook, which the session hook relies on: it counts nothing for a request that
// check refuses, so an app without the check would let those requests through uncounted.
export const sessionLimitPlugin = fp(sessionLimit, { name: 'limits-session', fastify: '5.x', dependencies: ['limits-ip', 'auth', 'csrf'] })
