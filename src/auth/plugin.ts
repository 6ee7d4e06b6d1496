import fp from 'fastify-plugin'
import type { FastifyContextConfig, FastifyInstance, FastifyRequest, HookHandlerDoneFunction } from 'fastify'
import { sessionRequired } from '../errors.js'
import { causeSummary } from '../plugins/answers.js'
import { createIdTokenVerifier, type IdTokenVerifier } from './id-token.js'
import { createIssuerKeys, type IssuerKeys } from './key-set.js'
import { createLogoutMarks } from './logout-marks.js'
import { createPatientRef } from './patient-ref.js'
import { presentedToken, type SessionTransport } from './presented.js'
import { NO_SESSION, createSessionStore, type Session, type SessionCounter, type SessionLookup, type SessionStore } from './session-store.js'
import type { CounterHit } from '../limits/counter-store.js'
import { createCsrfCheck, type CsrfFailure } from '../web/csrf.js'
import { createReplayGuard } from '../web/replay-guard.js'
import { isPromise } from '../state/awaitable.js'

export { createPatientRef } from './patient-ref.js'

export type AuthMode = 'required' | 'optional'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** Resolve the session before the handler: `required` answers 401 without one. */
    auth?: AuthMode
    /** Counted against `RATE_LIMIT_CANCEL` too, after the per-session limit (step 3). */
    cancelLimit?: boolean
    /**
     * `false`: counted against no per-session limit (sign-out). A session can end only once, so
     * there is nothing to limit, and a patient whose session spent its quota must still be able
     * to end it (on a shared device, that is when it matters).
     */
    sessionLimit?: false
    /** Every failure is a redirect (the sign-in callback): no error answer to document. */
    failsByRedirect?: boolean
    /**
     * The query's `slide=false` leaves the session's idle expiry where it is (`GET /auth/me`: a
     * session monitor's poll is no use of the session by its patient, and would otherwise keep an
     * unattended one alive up to its absolute lifetime).
     */
    slideOptional?: boolean
  }
  interface FastifyInstance {
    sessions: SessionStore
    /** The IdP's signing keys: one discovery and one JWKS cache for every verifier of its tokens. */
    issuerKeys: IssuerKeys
    idTokenVerifier: IdTokenVerifier
    /** Keyed hash of a patient's email for log lines (never the email itself). */
    patientRef: (email: string) => string
  }
  interface FastifyRequest {
    session: Session | null
    /** How the session arrived: cookie sessions need the CSRF check, bearer ones cannot be forged cross-site. */
    sessionTransport: SessionTransport | null
    /**
     * Why the CSRF check refuses the request's session, decided once, before the lookup (a refused
     * request counts nothing); the CSRF hook answers it. Null without a session, or when it passes.
     */
    csrfFailure: CsrfFailure | null
    /**
     * The session's per-client limits as its lookup counted them, in order (per session, then per
     * cancel), for the limits hook to publish and enforce; null without a session.
     */
    sessionHits: readonly CounterHit[] | null
  }
}

declare module '../app.js' {
  interface AppOverrides {
    /** jose's JWKS refetch cooldown after an unknown `kid` (30 s); tests shorten it. */
    jwksCooldownMs?: number
  }
}

export interface AuthPluginOptions {
  now?: () => number
  jwksCooldownMs?: number
}

async function auth (app: FastifyInstance, options: AuthPluginOptions): Promise<void> {
  const { config } = app
  const sessions = createSessionStore(app.sharedState, {
    idleTtlMs: config.sessions.idleTtlMs,
    absoluteTtlMs: config.sessions.absoluteTtlMs,
    ...(options.now === undefined ? {} : { now: options.now })
  })
  app.decorate('sessions', sessions)
  app.decorate('issuerKeys', createIssuerKeys({
    issuer: config.oidc.issuer,
    ...(options.jwksCooldownMs === undefined ? {} : { jwksCooldownMs: options.jwksCooldownMs })
  }))
  app.decorate('idTokenVerifier', createIdTokenVerifier({
    keys: app.issuerKeys,
    audiences: config.oidc.audiences,
    log: app.log,
    retired: createReplayGuard(app.sharedState, options.now, 'bff:idt:'),
    logouts: createLogoutMarks(app.sharedState, options.now),
    ...(options.now === undefined ? {} : { now: options.now })
  }))
  // The provider's discovery as the process starts, in the background: a mobile sign-out names
  // its end-session endpoint from the first request on (routes/auth.ts), and the first sign-in
  // does not wait for it. A failure is retried by the next token checked or sign-out.
  // A failure at start is said at start (once; later ones are the sign-ins' lines): an OIDC_ISSUER
  // mistyped, or whose discovery names another issuer, would otherwise go unnoticed until the
  // first patient's sign-in failed.
  app.addHook('onReady', function discoverProvider (done) {
    app.issuerKeys.resolve().catch(function saidAtStart (error: unknown) {
      app.log.warn({ err: { cause: causeSummary(error) } }, 'OIDC_ISSUER: the identity provider could not be discovered at start; sign-ins answer 503 until it can (each retries it)')
    })
    done()
  })
  app.decorate('patientRef', createPatientRef(config.keyRoot.secret))
  app.decorateRequest('session', null)
  app.decorateRequest('sessionTransport', null)
  app.decorateRequest('csrfFailure', null)
  app.decorateRequest('sessionHits', null)

  // The per-client limits of a session, counted as it is looked up: one Redis round trip for the
  // session and its limits. The limits hook (limits/plugins.ts) publishes and enforces them, after
  // the CSRF check. A request that check will refuse counts nothing (nor slides the idle expiry),
  // so a forged cross-site request spends none of its victim's quota: its verdict needs the headers alone, so it is
  // known before the lookup, and it is still answered after the 401 of a request without a
  // session (the contract's order).
  const csrfCheck = createCsrfCheck(config.corsOrigins)
  const perSession: readonly SessionCounter[] = [{ scope: 'session', rate: config.limits.session }]
  const perSessionThenCancel: readonly SessionCounter[] = [...perSession, { scope: 'cancel', rate: config.limits.cancel }]
  const none: readonly SessionCounter[] = []

  function countersOf (route: FastifyContextConfig): readonly SessionCounter[] {
    if (route.sessionLimit === false) return none
    return route.cancelLimit === true ? perSessionThenCancel : perSession
  }

  /** False when the route lets the query ask the lookup not to slide the idle expiry, and it does. */
  function slides (route: FastifyContextConfig, request: FastifyRequest): boolean {
    return !(route.slideOptional === true && (request.query as { slide?: unknown }).slide === 'false')
  }

  /** The request's session is the one its token names, or there is none (null). */
  function adopt (request: FastifyRequest, mode: AuthMode, transport: SessionTransport, { session, hits }: SessionLookup, done: HookHandlerDoneFunction, csrf: CsrfFailure | null, presented = true): void {
    if (session === null) {
      // Anything but an explicit 'optional' fails closed, so a mistyped mode never opens a route.
      // A bearer token sent and refused is named as such in the challenge (the app then knows to
      // sign in again rather than that it forgot the header).
      done(mode === 'optional' ? undefined : sessionRequired(presented && transport === 'bearer'))
      return
    }
    request.session = session
    request.sessionTransport = transport
    request.csrfFailure = csrf
    request.sessionHits = hits
    // Once per request: the access line, the audit record and the idempotency scope all use it.
    request.patient = app.patientRef(session.email)
    done()
  }

  // Synchronous on the memory store: every authenticated request passes here.
  app.addHook('onRequest', function resolveSession (request, _reply, done) {
    // Read once: Fastify builds `routeOptions` afresh on every access.
    const route = request.routeOptions.config
    const mode = route.auth
    if (mode === undefined) {
      done()
      return
    }
    const presented = presentedToken(request)
    if (presented === null) {
      adopt(request, mode, 'bearer', NO_SESSION, done, null, false)
      return
    }
    // A malformed token is refused by the store before any lookup (isWellFormedToken): no lookup
    // an attacker can drive with junk.
    const { token, transport } = presented
    // A request the CSRF check will refuse counts nothing, nor slides the idle expiry: it is no
    // use of the session by its patient (a sibling page's images would keep it alive).
    const csrf = csrfCheck(request, transport)
    const lookup = csrf === null
      ? sessions.lookup(token, countersOf(route), slides(route, request))
      : sessions.lookup(token, none, false)
    if (isPromise(lookup)) {
      lookup.then((found) => { adopt(request, mode, transport, found, done, csrf) }, done)
      return
    }
    adopt(request, mode, transport, lookup, done, csrf)
  })
}

export const authPlugin = fp(auth, { name: 'auth', fastify: '5.x', dependencies: ['answers'] })
