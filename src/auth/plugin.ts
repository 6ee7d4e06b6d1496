import fp from 'fastify-plugin'
import type { FastifyInstance, FastifyRequest, HookHandlerDoneFunction } from 'fastify'
import { sessionRequired } from '../errors.js'
import { sessionCookieOf } from './cookie.js'
import { createIdTokenVerifier, type IdTokenVerifier } from './id-token.js'
import { createIssuerKeys, type IssuerKeys } from './key-set.js'
import { createPatientRef } from './patient-ref.js'
import { createSessionStore, type Session, type SessionStore } from './session-store.js'
import { isPromise } from '../state/awaitable.js'

export { createPatientRef } from './patient-ref.js'

export type AuthMode = 'required' | 'optional'
export type SessionTransport = 'bearer' | 'cookie'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** Resolve the session before the handler: `required` answers 401 without one. */
    auth?: AuthMode
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

const BEARER = /^bearer[ \t]+([^ \t]+)[ \t]*$/i

/**
 * The session token of a request: the Authorization header when it carries a bearer, else the
 * cookie. A bearer header that is present wins even when it is bad, so a request never silently
 * falls back to the ambient cookie (and to the cookie's weaker, CSRF-exposed transport).
 */
export function presentedToken (request: FastifyRequest): { token: string, transport: SessionTransport } | null {
  const authorization = request.headers.authorization
  if (typeof authorization === 'string' && /^bearer(?:[ \t]|$)/i.test(authorization)) {
    return { token: BEARER.exec(authorization)?.[1] ?? '', transport: 'bearer' }
  }
  const cookie = sessionCookieOf(request.headers.cookie)
  if (typeof cookie === 'string') return { token: cookie, transport: 'cookie' }
  return null
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
    ...(options.now === undefined ? {} : { now: options.now })
  }))
  app.decorate('patientRef', createPatientRef(config.care360.apiKey))
  app.decorateRequest('session', null)
  app.decorateRequest('sessionTransport', null)

  /** The request's session is the one its token names, or there is none (null). */
  function adopt (request: FastifyRequest, mode: AuthMode, transport: SessionTransport, session: Session | null, done: HookHandlerDoneFunction): void {
    if (session === null) {
      // Anything but an explicit 'optional' fails closed, so a mistyped mode never opens a route.
      done(mode === 'optional' ? undefined : sessionRequired())
      return
    }
    request.session = session
    request.sessionTransport = transport
    // Once per request: the access line, the audit record and the idempotency scope all use it.
    request.patient = app.patientRef(session.email)
    done()
  }

  // Synchronous on the memory store: every authenticated request passes here.
  app.addHook('onRequest', function resolveSession (request, _reply, done) {
    const mode = request.routeOptions.config.auth
    if (mode === undefined) {
      done()
      return
    }
    const presented = presentedToken(request)
    if (presented === null) {
      adopt(request, mode, 'bearer', null, done)
      return
    }
    // A malformed token is refused by the store before any lookup (isWellFormedToken): no lookup
    // an attacker can drive with junk.
    const session = sessions.get(presented.token)
    if (isPromise(session)) {
      session.then((found) => { adopt(request, mode, presented.transport, found, done) }, done)
      return
    }
    adopt(request, mode, presented.transport, session, done)
  })
}

export const authPlugin = fp(auth, { name: 'auth', fastify: '5.x', dependencies: ['answers'] })
