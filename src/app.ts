import type { IncomingMessage, Server, ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import Fastify, { LogController, type FastifyHttpOptions, type FastifyInstance, type FastifyRequest, type onResponseHookHandler, type preHandlerHookHandler } from 'fastify'
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { DestinationStream } from 'pino'
import type { Config } from './config.js'
import { answersPlugin, clientErrorAnswer, closesAfterThisAnswer, connectRefusedAnswer, expectationFailedAnswer, frameworkErrorAnswer, identifyRequest, inviteBodiesWithinLimit, isRefusedForFraming, pendingResponse } from './plugins/answers.js'
import { accessLogPlugin, deferredChildLogger, loggerOptions } from './logging.js'
import { createSharedState, type SharedState } from './state/redis.js'
import { inFlightTtlFor } from './idempotency/index.js'
import { IDP_FETCH_TIMEOUT_MS } from './auth/key-set.js'
import { healthRoutes } from './routes/health.js'
import { appointmentRoutes } from './routes/appointments.js'
import { care360Plugin } from './plugins/care360.js'
import { authPlugin } from './auth/plugin.js'
import { authRoutes } from './routes/auth.js'
import { webSecurityPlugin } from './web/security.js'
import { openApiPlugin } from './openapi.js'
import { csrfPlugin } from './web/csrf.js'
import { webSignInPlugin } from './web/plugin.js'
import { ipLimitPlugin, proxyTrust, sessionLimitPlugin } from './limits/plugins.js'
import { metricsPlugin } from './metrics.js'
import { afterEveryAnswer, appendHook } from './plugins/after-answer.js'
import { listenerOptions, REQUEST_TIMEOUT_MS, setHeadersTimeout } from './listener.js'

declare module 'fastify' {
  interface FastifyInstance {
    config: Config
    sharedState: SharedState
    /**
     * True from the start of a shutdown (SHUTDOWN_DELAY's wait, then `close()`): every answer
     * closes its connection and `/readyz` answers 503. New connections are refused only once
     * `close()` has closed the listener.
     */
    draining: boolean
  }
}

export interface AppOverrides {
  /** Where log lines go (tests capture them); stdout otherwise. */
  logStream?: DestinationStream
  /** The clock of the in-memory stores, injected by tests. */
  now?: () => number
}

export type App = FastifyInstance

/**
 * Shutdown closes every connection once its answer is sent. Fastify answers the requests that
 * arrive after `close()` began with `Connection: close`, but not those already in flight then:
 * their keep-alive connections (a load balancer's) stayed open after the answer, and
 * `server.close()` waited for them until their idle timeout (65 s), past the shutdown deadline
 * (fastify/fastify#7044). So from the first step of `close()` every answer to the last request read
 * on its connection says `Connection: close`, and Node closes the socket after it.
 *
 * And a client still sending its request's headers when shutdown begins: Node stops enforcing
 * `headersTimeout` once the server closes, so it held the shutdown until its deadline
 * (shutdownDeadlineFor, then exit 1). It gets what a running server gives it, counted from the start of the shutdown: after
 * `headersTimeout`, a 408 and the end of its connection. A request whose headers arrived is in
 * flight, and is answered whatever its pace (up to the shutdown deadline).
 */
function drainOnClose (app: FastifyInstance): void {
  const sockets = new Set<Socket>()
  app.server.on('connection', function trackConnection (socket: Socket) {
    sockets.add(socket)
    socket.once('close', () => sockets.delete(socket))
  })
  // Only the answer to the last request read on a connection closes it: Node writes nothing behind
  // an answer that closes its connection, so a request a client pipelined behind another would
  // run (a cancel reaching Care360) and never be answered. Noted as Node hands it over, before
  // Fastify routes it: a request refused before routing (frameworkErrorAnswer, no hook) or by an
  // onRequest hook counts too. A request with an unsupported Expect too, which Fastify never sees:
  // its 417 closes the connection (expectationFailedAnswer), so the answer before it must not.
  const lastAnswer = new WeakMap<Socket, ServerResponse>()
  function noteLastRead (request: IncomingMessage, answer: ServerResponse): void {
    lastAnswer.set(request.socket, answer)
  }
  app.server.prependListener('request', noteLastRead)
  app.server.prependListener('checkExpectation', noteLastRead)
  let cutOff: NodeJS.Timeout | undefined
  let cutOffPast = false
  /**
   * No response object: no request of this connection got past its headers (one idle after an
   * answer was closed when the shutdown began; one that never sent a byte is still here). The same
   * answer as Node's own headersTimeout gives both. Or one was answered before its body, still
   * arriving: clientErrorAnswer ends that connection without a second answer.
   */
  function cutOffUnfinishedHeaders (socket: Socket): void {
    if (!socket.destroyed && pendingResponse(socket) == null) {
      clientErrorAnswer.call(app, Object.assign(new Error('headers not received before the shutdown'), { code: 'ERR_HTTP_REQUEST_TIMEOUT' }), socket)
    }
  }
  app.addHook('preClose', function startDraining (done) {
    app.draining = true
    for (const socket of sockets) closeOnceIdle(socket)
    cutOff = setTimeout(function cutOffEveryUnfinishedHeaders () {
      cutOffPast = true
      for (const socket of sockets) cutOffUnfinishedHeaders(socket)
    }, app.server.headersTimeout).unref()
    done()
  })
  app.addHook('onClose', function stopCutOff (_instance, done) {
    clearTimeout(cutOff)
    done()
  })
  /**
   * A connection that close()'s sweep of idle connections could not end yet, because its last
   * request was answered keep-alive before the drain but is not done: its answer is still being
   * written (to a slow reader, or queued behind an earlier answer; closeIdleButUnwritten spares
   * it), or its body is still arriving (an answer made before the body, such as a hook's refusal).
   * Nothing else would close it (the 408 at the headers timeout would be a second answer to a
   * request answered). So once that request is done, the same sweep runs again: idle, the
   * connection ends, and nothing read behind the answer runs; a request read since (pipelined)
   * took its place, and its own answer closes the connection (markClosingAnswer); one
   * whose headers are arriving is not idle, and is in flight as on any other connection (its
   * headers bounded by the drain's cut-off, or, once that has passed, by the same bound again).
   */
  function closeOnceIdle (socket: Socket): void {
    const answer = lastAnswer.get(socket)
    if (answer === undefined) return
    function closeIfIdle (): void {
      if (lastAnswer.get(socket) !== answer) return
      app.server.closeIdleConnections()
      // Still open with no answer under way: a next request's headers are arriving. Past the
      // cut-off above, they get its bound counted from now (else nothing would end them before
      // the shutdown's deadline).
      if (cutOffPast && !socket.destroyed && pendingResponse(socket) == null) {
        setTimeout(cutOffUnfinishedHeaders, app.server.headersTimeout, socket).unref()
      }
    }
    if (!answer.writableFinished) answer.once('finish', closeIfIdle)
    if (!answer.req.complete) answer.req.once('end', closeIfIdle)
  }
  /**
   * `server.close()` first destroys the connections Node deems idle: every request read in full
   * and the answer on the socket ended (`finished`), not written. So an answer still going out to
   * a slow reader was cut off, and the answers queued behind it (pipelining) dropped: requests run,
   * a cancel gone through, and its answer never delivered. Such a connection is left to close once
   * its last answer is written (closeOnceIdle, from preClose, which runs first); the others
   * go as Node decides.
   */
  const closeIdleConnections = app.server.closeIdleConnections
  app.server.closeIdleConnections = function closeIdleButUnwritten (this: Server): void {
    const writing = [...sockets].filter((socket) => lastAnswer.get(socket)?.writableFinished === false)
    const spared = function spared (this: Socket): Socket { return this }
    for (const socket of writing) socket.destroy = spared
    try {
      closeIdleConnections.call(this)
    } finally {
      for (const socket of writing) Reflect.deleteProperty(socket, 'destroy')
    }
  }
  app.addHook('onSend', function markClosingAnswer (request, reply, payload, done) {
    // Fastify says `Connection: close` to a body it refused (not JSON, another media type, too
    // large: 400, 415, 413), in case more of it comes. Node hands a request pipelined behind
    // another to its route as soon as it is read, while the first one's body is still being
    // parsed: closing after the first answer would leave that request run and unanswered. So a
    // request that has arrived whole keeps its connection (its framing held; what was pipelined
    // behind it is answered in turn), and one whose body is still arriving closes it, with nothing
    // read behind it yet. This service's own refusals before routing (framing, Host) close always.
    // A request refused here whose connection a later answer marked closing (a 417 read behind it
    // in the same packet) is still the one answered first: it keeps the connection for that one.
    if (reply.getHeader('connection') === 'close' && !isRefusedForFraming(request.raw)) {
      if (request.raw.complete) reply.removeHeader('connection')
      else closesAfterThisAnswer(request.raw.socket)
    }
    if (app.draining) {
      const socket = request.raw.socket
      const last = lastAnswer.get(socket)
      // None noted: a request no socket carried (light-my-request's inject) is its own last.
      if (last === reply.raw || last === undefined) {
        reply.header('connection', 'close')
        // Node still hands a request read after this answer to its route until the socket is gone.
        closesAfterThisAnswer(socket)
      } else {
        // Fastify itself says `Connection: close` (on the raw response) to every request routed
        // once close() began: not to one with a request read behind it, which would run unanswered.
        reply.raw.removeHeader('connection')
      }
    }
    done(null, payload)
  })
}

/**
 * `close()` waits for connections, not for handlers: a request whose client left (its own timeout,
 * a load balancer's) has no connection to wait for, while its handler may still be writing what a
 * cancel that went through leaves behind (its Idempotency-Key record, then its access line with
 * the audit record, its duration). So the requests whose handler began are counted until their
 * after-answer work has run, and `close()` waits for them, right after the listener closes and
 * before the upstream pool and Redis (onClose hooks run last-registered first: `settleOnClose` is
 * registered after every plugin), up to `boundMs`, longer than any request can take.
 *
 * Counted from the route's preHandler, not from onRequest: a request refused before its handler,
 * or whose body never arrived, has nothing left to do when its client goes, and no answer to
 * uncount it.
 */
export function trackRunningRequests (app: FastifyInstance): { settleOnClose: (boundMs: number) => void } {
  const running = new Set<FastifyRequest>()
  let emptied: (() => void) | null = null
  // Both on each route as it is added, so that a route has both or neither (the not-found
  // handler has neither: it leaves nothing behind).
  const countRunning: preHandlerHookHandler = function countRunning (request, _reply, done) {
    running.add(request)
    done()
  }
  app.addHook('onRoute', function countRunningOf (route) {
    route.preHandler = appendHook(route.preHandler, countRunning)
  })
  // After the access line and the metrics (their plugins are registered before this). Nothing
  // after the requests no route matched: none was counted.
  const uncountRunning: onResponseHookHandler = function uncountRunning (request, _reply, done) {
    if (running.delete(request) && running.size === 0) emptied?.()
    done()
  }
  afterEveryAnswer(app, () => uncountRunning, null)
  return {
    settleOnClose (boundMs) {
      app.addHook('onClose', async function settleRunningRequests () {
        if (running.size === 0) return
        const left = running.size
        let timer: NodeJS.Timeout | undefined
        const settled = new Promise<boolean>((resolve) => {
          emptied = () => { resolve(true) }
          timer = setTimeout(resolve, boundMs, false)
        })
        const inTime = await settled
        clearTimeout(timer)
        if (!inTime) app.log.warn({ requests: running.size, of: left }, 'shutdown: requests still running at the deadline')
      })
    }
  }
}

/**
 * A shutdown (server.ts, on SIGTERM): with `delayMs` (SHUTDOWN_DELAY), first only unready for that
 * long: `/readyz` answers 503 and every answer closes its connection, while new connections are
 * still accepted and served. Behind a load balancer that learns of a replica's end only from its
 * probes or from an orchestrator's endpoint list (Kubernetes removes a terminating pod from its
 * Services while the pod already runs its shutdown), requests keep arriving for a few seconds:
 * refused at once, they would fail (a reset, a 502) instead of being served. Then the drain
 * (`close()`, drainOnClose) as without a delay.
 */
export async function shutDown (app: App, delayMs: number): Promise<void> {
  if (delayMs > 0) {
    app.draining = true
    app.log.info({ delayMs }, 'unready; the listener closes after SHUTDOWN_DELAY')
    await sleep(delayMs)
  }
  await app.close()
}

/**
 * The JSON body limit of every route but the mobile sign-in (its ID token has its own): small, as
 * the contract wants, and still above the largest valid cancel written the longest way, 500 code
 * points outside the BMP each escaped as a surrogate pair (\\uXXXX\\uXXXX, 12 bytes: 6013 bytes in
 * all, which JSON encoders such as Python's json.dumps write by default).
 */
export const BODY_LIMIT_BYTES = 8192

/**
 * How long a shutdown waits for the requests in flight: as long as the last request it may still
 * take can run. That request may finish arriving up to REQUEST_TIMEOUT_MS after the shutdown
 * began (its headers within the headers timeout, drainOnClose; its body as a running server
 * allows, which Node no longer enforces once the server closes: the deadline is then the bound),
 * then run as long as the longest request can: a keyed cancel resolving an unknown outcome makes
 * three upstream calls, each up to CV_TIMEOUT_MS (`inFlightTtlFor`); a web sign-in's callback
 * three calls to the identity provider (discovery, token endpoint, keys), each up to
 * IDP_FETCH_TIMEOUT_MS, and a margin. So a cancel sent upstream is never cut off before its answer
 * is recorded and returned, nor a sign-in or a back-channel logout halfway.
 */
export function shutdownDeadlineFor (upstreamTimeoutMs: number): number {
  return REQUEST_TIMEOUT_MS + Math.max(inFlightTtlFor(upstreamTimeoutMs), 3 * IDP_FETCH_TIMEOUT_MS + 2000)
}

/**
 * Builds the service from configuration passed in as data. Nothing is listened, nothing reads
 * the process: `server.ts` does that.
 */
export async function buildApp (config: Config, overrides: AppOverrides = {}): Promise<App> {
  const options: FastifyHttpOptions<Server> = {
    logger: loggerOptions(config, overrides.logStream),
    // One access line per request, written by the access-log plugin, instead of Fastify's two.
    logController: new LogController({ disableRequestLogging: true }),
    genReqId: identifyRequest,
    childLoggerFactory: deferredChildLogger,
    // X-Forwarded-* is believed only from the configured load balancers (Fastify 5.12.1+ takes
    // addresses/CIDRs here; a hop count would trust whatever the client put first).
    trustProxy: proxyTrust(config.trustProxy),
    bodyLimit: BODY_LIMIT_BYTES,
    // Slow clients are cut off: a request has 10 s to arrive whole, headers 5 s; a connection
    // stays silent at most twice as long as the shutdown's deadline (a client that stops
    // reading): a key-less cancel that waited for a leader on another replica, then found it
    // dead and led itself, may run for two in-flight lifetimes.
    ...listenerOptions(2 * shutdownDeadlineFor(config.care360.timeoutMs)),
    return503OnClosing: false,
    forceCloseConnections: 'idle',
    routerOptions: { maxParamLength: 256 },
    ajv: {
      // Unknown fields are refused, never silently dropped, and types are never coerced.
      customOptions: { removeAdditional: false, coerceTypes: false, useDefaults: false }
    },
    clientErrorHandler: clientErrorAnswer,
    frameworkErrors: frameworkErrorAnswer
  }
  const app = Fastify(options).withTypeProvider<TypeBoxTypeProvider>()
  setHeadersTimeout(app.server)
  app.server.on('checkExpectation', expectationFailedAnswer.bind(app))
  inviteBodiesWithinLimit(app)
  app.server.on('connect', connectRefusedAnswer.bind(app))

  app.decorate('config', config)
  app.decorate('draining', false)
  drainOnClose(app)
  const sharedState = createSharedState({ url: config.redisUrl, log: app.log })
  app.decorate('sharedState', sharedState)
  app.addHook('onClose', async function closeSharedState () { await sharedState.close() })

  // Tier 1: cross-cutting plugins. Global onRequest hooks run in registration order, which is
  // the contract's order: answer stamping, per-IP limit, session, CSRF, per-session limit.
  await app.register(answersPlugin)
  // Before any route: each route gets its access line as it is added.
  await app.register(accessLogPlugin)
  // Before any route: each route gets its duration hook as it is added.
  await app.register(metricsPlugin)
  // Before any route, after the access log and metrics plugins, whose after-answer hooks come first.
  const runningRequests = trackRunningRequests(app)
  // Before any route, so that the document sees them all.
  await app.register(openApiPlugin, { publicUrl: config.oidc.web?.publicUrl ?? null })
  await app.register(webSecurityPlugin)
  await app.register(ipLimitPlugin, { now: overrides.now })

  // Tier 2: the application's own services.
  await app.register(authPlugin, { now: overrides.now, jwksCooldownMs: overrides.jwksCooldownMs })
  await app.register(csrfPlugin)
  await app.register(webSignInPlugin, { now: overrides.now })
  await app.register(sessionLimitPlugin, { now: overrides.now })
  // Redis back after a break may have lost the upstream cooldown this process still honours.
  sharedState.onBack(app.upstreamGate.restoreCooldown)
  // Every upstream call passes the org budget and the shared cooldown.
  await app.register(care360Plugin, { gate: app.upstreamGate })

  // Tier 3: routes.
  await app.register(healthRoutes)
  await app.register(authRoutes)
  await app.register(appointmentRoutes)
  // Last: the first onClose hook to run once the listener has closed.
  runningRequests.settleOnClose(shutdownDeadlineFor(config.care360.timeoutMs))

  return app
}
