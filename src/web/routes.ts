import * as client from 'openid-client'
import type {} from '../auth/plugin.js'
import cookie from '@fastify/cookie'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { Type } from 'typebox'
import { isWellFormedToken, sessionIdOf } from '../auth/session-store.js'
import { ApiError } from '../errors.js'
import { causeSummary } from '../plugins/answers.js'
import { idTokenId } from '../auth/id-token.js'
import { createUnlessLoggedOut } from '../auth/sign-in.js'
import { isLoginCookieName, LOGIN_COOKIE_OPTIONS, loginCookieName, MAX_SIGN_INS_UNDER_WAY, SESSION_COOKIE, SESSION_COOKIE_OPTIONS } from './cookies.js'
import type { LoginStateSeal } from './login-state.js'
import { WEB_SCOPES, type WebOidc } from './oidc.js'
import { safeReturnTo } from './return-to.js'
import { backchannelLogoutRoute, type LogoutClaims } from './backchannel.js'

/**
 * Web sign-in: the authorization code flow with PKCE, as the web app's confidential client (the
 * IETF "OAuth 2.0 for Browser-Based Applications" BFF pattern). Tokens stay here; the browser gets
 * only an opaque session id in a `__Host-` cookie.
 */

/**
 * The fixed reasons a sign-in fails, sent to the web app as `?signin_error=`. Short codes only:
 * never the IdP's own text, which an attacker could choose by forging a callback URL.
 */
export type SignInError =
  | 'access_denied' // the user (or the IdP's policy) refused
  | 'idp_error' // the IdP answered the authorization request with another error
  | 'login_expired' // no, forged or expired login state: the sign-in was not started in this browser, or too long ago
  | 'state_mismatch' // the callback belongs to none of the sign-ins under way in this browser
  | 'idp_unavailable' // discovery or the token endpoint could not be reached, or did not answer in time
  | 'exchange_failed' // the code was refused (replayed, expired) or the token answer was unusable
  | 'invalid_token' // the ID token failed verification (signature, nonce, audience, ...)
  | 'email_unverified' // no verified email: the service acts for a patient by email only
  | 'session_unavailable' // the session store could not answer
  | 'rate_limited' // the per-IP limit refused the callback (a shared address sending much)
  | 'server_error' // another answer before the callback could run, or a fault of ours

/** The sign-in failures an operator has to act on. */
const OPERATOR_FAILURES: ReadonlySet<SignInError> = new Set<SignInError>(['idp_unavailable', 'session_unavailable', 'server_error'])

export interface WebRoutesOptions {
  oidc: WebOidc
  seal: LoginStateSeal
  /** Where the patient web app lives: sign-in ends there (returnTo, signin_error). */
  webAppUrl: string
  verifyLogoutToken: (token: string) => Promise<LogoutClaims>
}

const LoginQuery = Type.Object({
  returnTo: Type.Optional(Type.String({ description: 'A path on the web app (WEB_APP_URL, default PUBLIC_URL) to return to after sign-in; anything else means `/`' }))
})

const redirectAnswer = (description: string) => ({ 302: { description, type: 'null' } })

/**
 * The IdP did not answer, as opposed to an IdP that answered: fetch failed (openid-client passes
 * its TypeError on), or the request's deadline passed, which openid-client reports as a
 * ClientError coded OAUTH_TIMEOUT (OAUTH_ABORT for an aborted request).
 */
function isUnreachable (error: unknown): boolean {
  if (error instanceof TypeError) return true
  if (!(error instanceof client.ClientError)) return false
  return error.code === 'OAUTH_TIMEOUT' || error.code === 'OAUTH_ABORT'
}

/** openid-client's failure, in our fixed vocabulary. */
export function exchangeFailure (error: unknown): SignInError {
  if (error instanceof client.ResponseBodyError) return 'exchange_failed'
  if (isUnreachable(error)) return 'idp_unavailable'
  const code = (error as { code?: unknown }).code
  // JWT and JWS checks of the ID token (claims, nonce; jose's own); the rest is a bad token answer.
  if (typeof code === 'string' && (code.startsWith('OAUTH_JWT') || code.startsWith('ERR_J'))) return 'invalid_token'
  if (code === 'OAUTH_INVALID_RESPONSE' && signatureFailed(error)) return 'invalid_token'
  return 'exchange_failed'
}

/**
 * Whether an invalid response was the ID token's signature: openid-client wraps oauth4webapi's
 * "JWT signature verification failed", whose own cause carries the signature it refused.
 */
function signatureFailed (error: unknown): boolean {
  let cause = (error as { cause?: unknown }).cause
  for (let depth = 0; depth < 3 && typeof cause === 'object' && cause !== null; depth++) {
    if ('signature' in cause) return true
    cause = (cause as { cause?: unknown }).cause
  }
  return false
}

/**
 * The names of the login cookies (sign-ins under way) a request brings: the last few, as a browser
 * holds no more (a client sending hundreds would have each opened and cleared).
 */
function loginCookiesOf (request: FastifyRequest): string[] {
  return Object.keys(request.cookies).filter(isLoginCookieName).slice(-2 * MAX_SIGN_INS_UNDER_WAY)
}

export async function webRoutes (app: FastifyInstance, options: WebRoutesOptions): Promise<void> {
  const { oidc, seal, webAppUrl } = options
  // The login state and session cookies are read and set here only: parsed for these routes.
  await app.register(cookie, { hook: 'onRequest' })

  /** Where a failed sign-in sends the browser, once it is logged and counted. */
  function failureLocation (request: FastifyRequest, reason: SignInError, cause?: unknown): string {
    // A sign-in the per-IP limit refused was never tried: a limiter decision (counted by the
    // limit), not a failed sign-in, as on POST /auth/session.
    // Failures at the start (IdP unreachable) count too: the patient was sent back without a session.
    if (reason !== 'rate_limited') app.metrics.recordSignIn('web', false)
    const fields = { signinError: reason, cause: causeSummary(cause) }
    // The patient's doing (refused, expired, a forged callback) is information; ours or the
    // identity provider's a warning, once a minute per reason while it lasts.
    if (OPERATOR_FAILURES.has(reason)) app.repeatedWarnings.warn(request.log, fields, `web sign-in failed: ${reason}`)
    else request.log.info(fields, 'web sign-in failed')
    return `${webAppUrl}/?signin_error=${reason}`
  }

  function failSignIn (request: FastifyRequest, reply: FastifyReply, reason: SignInError, cause?: unknown): FastifyReply {
    return reply.redirect(failureLocation(request, reason, cause), 302)
  }

  /**
   * The sign-in routes' onSend: answers given before (or instead of) the handler, the per-IP
   * limit's 429 above all, are failures too. The browser is in the middle of a sign-in (these are
   * navigations, not the app's fetches), and goes back to the app as for any failure.
   */
  function failToTheApp (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (error: null, payload: unknown) => void): void {
    if (reply.statusCode < 400) {
      done(null, payload)
      return
    }
    const location = failureLocation(request, reply.statusCode === 429 ? 'rate_limited' : 'server_error')
    reply.code(302).header('location', location).removeHeader('content-type')
    done(null, '')
  }

  // Neither sign-in route answers HEAD (Fastify adds one to every GET): both change state (a login
  // cookie; a code redeemed, a session made), and a HEAD from a link scanner or prefetcher would
  // spend the one-time code before the browser's GET (RFC 9110, 9.2.1: HEAD is a safe method).
  app.get('/auth/login', {
    exposeHeadRoute: false,
    attachValidation: true,
    schema: {
      tags: ['auth'],
      summary: 'Web sign-in: redirects to the identity provider (authorization code flow with PKCE)',
      querystring: LoginQuery,
      response: redirectAnswer('To the identity provider, or to the web app with `signin_error` when it is unreachable (`idp_unavailable`) or the per-IP limit refused the sign-in (`rate_limited`)')
    },
    config: { failsByRedirect: true },
    onSend: failToTheApp
  }, async function startSignIn (request, reply) {
    // A repeated or malformed returnTo fails validation: it falls back to `/` like any unsafe one.
    const returnTo = request.validationError === undefined ? safeReturnTo((request.query as { returnTo?: unknown }).returnTo) : '/'
    let configuration: client.Configuration
    try {
      configuration = await oidc.configuration()
    } catch (error) {
      return failSignIn(request, reply, 'idp_unavailable', error)
    }
    const codeVerifier = client.randomPKCECodeVerifier()
    const state = client.randomState()
    const nonce = client.randomNonce()
    const url = client.buildAuthorizationUrl(configuration, {
      redirect_uri: oidc.redirectUri,
      scope: WEB_SCOPES,
      code_challenge: await client.calculatePKCECodeChallenge(codeVerifier),
      code_challenge_method: 'S256',
      state,
      nonce
    })
    // The session this browser has now (this navigation comes from the web app, same-site, so its
    // SameSite=Strict cookie is here): sign-in ends it (the callback will not see the cookie).
    const current = request.cookies[SESSION_COOKIE]
    const previousSession = current !== undefined && isWellFormedToken(current) ? sessionIdOf(current) : undefined
    // Sign-ins begun before, in other tabs, go on; beyond a few, the oldest (or unreadable) end.
    // Newest first: by when each began (in seconds), then by the cookie order, which browsers
    // send oldest first (RFC 6265, 5.4), reversed.
    const underWay = await Promise.all(loginCookiesOf(request).reverse().map(async (name) => ({ name, startedAt: (await seal.open(request.cookies[name]))?.startedAt ?? -1 })))
    underWay.sort((a, b) => b.startedAt - a.startedAt)
    for (const { name } of underWay.slice(MAX_SIGN_INS_UNDER_WAY - 1)) reply.clearCookie(name, LOGIN_COOKIE_OPTIONS)
    reply.setCookie(loginCookieName(state), await seal.seal({ state, nonce, codeVerifier, returnTo, ...(previousSession === undefined ? {} : { previousSession }) }), LOGIN_COOKIE_OPTIONS)
    return reply.redirect(url.href, 302)
  })

  app.get('/auth/callback', {
    exposeHeadRoute: false,
    schema: {
      tags: ['auth'],
      summary: 'Finishes web sign-in: sets the session cookie and redirects to `returnTo`, or to the web app with `signin_error`',
      response: redirectAnswer('To `returnTo` with the session cookie set, or to the web app with `signin_error=<reason>`')
    },
    config: { failsByRedirect: true },
    onSend: failToTheApp
  }, async function finishSignIn (request, reply) {
    const query = request.query as Record<string, unknown>
    // This sign-in's login state (the one its `state` names), single use whatever happens next;
    // another tab's sign-in goes on.
    const name = typeof query.state === 'string' ? loginCookieName(query.state) : null
    if (name !== null && request.cookies[name] !== undefined) reply.clearCookie(name, LOGIN_COOKIE_OPTIONS)
    const login = await seal.open(name === null ? undefined : request.cookies[name])
    if (login === null) return failSignIn(request, reply, loginCookiesOf(request).some((other) => other !== name) ? 'state_mismatch' : 'login_expired')
    // A sealed state under another sign-in's name.
    if (query.state !== login.state) return failSignIn(request, reply, 'state_mismatch')
    // The IdP's error answer is read by openid-client below, after its `iss` (RFC 9207, 2.4: error
    // responses too) and `state` checks: a link to the callback with an error of anyone's
    // choosing, or another issuer's, is no IdP's answer.

    let configuration: client.Configuration
    try {
      configuration = await oidc.configuration()
    } catch (error) {
      return failSignIn(request, reply, 'idp_unavailable', error)
    }
    // The URL the IdP redirected to, rebuilt from PUBLIC_URL (never from Host or X-Forwarded-*).
    // It has a query: the state matched above came from it.
    const search = request.url.slice(request.url.indexOf('?'))
    let claims: client.IDToken
    let idToken: string
    try {
      const tokens = await client.authorizationCodeGrant(configuration, new URL(`${oidc.redirectUri}${search}`), {
        pkceCodeVerifier: login.codeVerifier,
        expectedState: login.state,
        expectedNonce: login.nonce,
        idTokenExpected: true
      })
      // expectedNonce makes openid-client require and verify an ID token.
      claims = tokens.claims() as client.IDToken
      idToken = tokens.id_token as string
    } catch (error) {
      if (error instanceof client.AuthorizationResponseError) return failSignIn(request, reply, error.error === 'access_denied' ? 'access_denied' : 'idp_error', error)
      return failSignIn(request, reply, exchangeFailure(error), error)
    }
    const email = claims.email
    if (typeof email !== 'string' || !email.includes('@') || email.length > 254 || claims.email_verified !== true) {
      return failSignIn(request, reply, 'email_unverified')
    }

    try {
      // Never adopt a session id from before sign-in (session fixation): whatever session the
      // browser had at /auth/login or brought here is ended, and the session below gets a fresh
      // id.
      // This ID token will leave the server as the end-session URL's id_token_hint: it must never
      // become a session of its own through POST /auth/session.
      await app.idTokenVerifier.retire(idTokenId(idToken))
      const previous = request.cookies[SESSION_COOKIE]
      if (previous !== undefined && isWellFormedToken(previous)) await app.sessions.revoke(previous)
      if (login.previousSession !== undefined) await app.sessions.revokeById(login.previousSession)
      const idpSessionId = typeof claims.sid === 'string' && claims.sid !== '' ? claims.sid : null
      // A back-channel logout that arrived while this sign-in was at the IdP ended it: no session
      // outlives it. The patient signs in again, as after an expired login (a store failure is the
      // catch below's session_unavailable). Without auth_time, the sign-in at the IdP is known to
      // have come after /auth/login only (the token's iat is the code exchange, after any logout
      // during the sign-in): a logout by subject since then refuses it.
      const signIn = { issuer: claims.iss, subject: claims.sub, sid: idpSessionId, authTime: claims.auth_time ?? Math.min(claims.iat, login.startedAt) }
      if (await app.idTokenVerifier.loggedOut(signIn)) {
        return failSignIn(request, reply, 'login_expired')
      }
      // And once more after the session is made: a logout that landed meanwhile ends it too.
      const created = await createUnlessLoggedOut(app.sessions, app.idTokenVerifier, signIn, {
        email,
        subject: claims.sub,
        issuer: claims.iss,
        method: 'web',
        idpSessionId,
        idToken
      })
      if (created === null) return failSignIn(request, reply, 'login_expired')
      const { token, session } = created
      reply.setCookie(SESSION_COOKIE, token, SESSION_COOKIE_OPTIONS)
      request.log.info({ patient: app.patientRef(session.email), method: 'web' }, 'session created')
    } catch (error) {
      /* c8 ignore next -- the store throws ApiErrors (503) only; anything else is our bug */
      if (!(error instanceof ApiError)) throw error
      return failSignIn(request, reply, 'session_unavailable', error)
    }
    app.metrics.recordSignIn('web', true)
    return reply.redirect(`${webAppUrl}${login.returnTo}`, 302)
  })

  await app.register(backchannelLogoutRoute, { verify: options.verifyLogoutToken })
}
