import fp from 'fastify-plugin'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { SessionTransport } from '../auth/presented.js'
import { ApiError, ErrorCode } from '../errors.js'

/**
 * CSRF protection for cookie sessions, as one global hook so that no route can forget it (the
 * Duende BFF pattern: a static `X-CSRF: 1` header, which a cross-site form or a "simple" request
 * cannot carry, and which a cross-origin script can only send after a CORS preflight that only
 * CORS_ORIGINS pass). Registered after the session hook, so that a request without a valid
 * session is answered 401 first (contract step 1, then step 2). The verdict needs the headers
 * alone, so the session hook decides it once, before its lookup: a request this check refuses
 * counts nothing against the session's limits (auth/plugin.ts). This hook answers it.
 */

/** Methods that change nothing (RFC 9110 section 9.2.1); every other method is checked. */
const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS'])

export type CsrfFailure = 'cross-site' | 'header' | 'origin' | 'embedded' | 'prefetch' | 'navigation'

/** Why a request fails the check, given how its session token came; null when it passes. */
export type CsrfCheck = (request: FastifyRequest, transport: SessionTransport) => CsrfFailure | null

export const csrfRejected = (): ApiError =>
  new ApiError(403, ErrorCode.CSRF_REJECTED, 'Cross-site request refused: send X-CSRF: 1 from an allowed origin')

/** Why the request fails the check, or null when it passes. */
export function csrfFailure (request: FastifyRequest, allowedOrigins: ReadonlySet<string>): CsrfFailure | null {
  // Fetch Metadata: a browser says outright when another site started the request.
  if (request.headers['sec-fetch-site'] === 'cross-site') return 'cross-site'
  if (request.headers['x-csrf'] !== '1') return 'header'
  const origin = request.headers.origin
  if (origin !== undefined && !allowedOrigins.has(origin)) return 'origin'
  return null
}

/**
 * Whether another origin's page embedded the request, by the browser's Fetch Metadata: an image,
 * a script or a style (`no-cors`), or a frame (a navigation other than a top-level one). The
 * SameSite=Strict cookie rides along when that page is on our site (a sibling subdomain), and
 * although such a GET reads nothing (no CORS grant, CORP same-origin, frames denied), it would
 * spend the patient's per-session quota: a page left open could lock its visitor out of the app.
 * A cookie-session API serves none of them. Browsers without Fetch Metadata send none of these
 * headers, and same-origin requests and top-level navigations pass.
 */
function isEmbeddedElsewhere (request: FastifyRequest): boolean {
  const site = request.headers['sec-fetch-site']
  if (site !== 'same-site' && site !== 'cross-site') return false
  const mode = request.headers['sec-fetch-mode']
  return mode === 'no-cors' || (mode === 'navigate' && request.headers['sec-fetch-dest'] !== 'document')
}

/**
 * Whether the request is a same-site page's navigation that its user did not make: no
 * `Sec-Fetch-User: ?1`, which a browser sends only with a navigation a user activated. A sibling
 * page that has opened a window once (on any click) can navigate it from script again and again,
 * each a top-level document with the same-site cookie and no `Origin`. The patient's own
 * navigations pass: a link clicked (`?1`), an address typed or a reload (`Sec-Fetch-Site: none`).
 */
function isScriptedNavigation (request: FastifyRequest): boolean {
  return request.headers['sec-fetch-site'] === 'same-site' && request.headers['sec-fetch-mode'] === 'navigate' &&
    request.headers['sec-fetch-user'] !== '?1'
}

/**
 * `Sec-Purpose` (a structured-field list, e.g. `prefetch`, `prefetch;prerender`) with a prefetch
 * item: the browser asked ahead of any navigation, on a page's speculation rules or its own guess.
 * Chromium sends a page's prefetches of another origin as navigations it began itself
 * (`Sec-Fetch-Site: none`), with the same-site cookie, dozens a load: a sibling page's list would
 * spend the session's quota. A JSON API serves no prefetch (a refused one is dropped, and the
 * navigation, if it comes, asks again).
 */
const PREFETCH = /(?:^|,)[ \t]*prefetch[ \t]*(?:[;,]|$)/

/**
 * Why a safe request with the cookie is refused: a prefetch, another origin's page embedded it, a
 * same-site page navigated to it without its user, or a page of an origin outside CORS_ORIGINS
 * fetched it. A credentialed GET is a simple CORS request (no
 * preflight): the browser sends it with the same-site cookie and only hides the answer from the
 * script, so it would spend the session's quota as an image does. Its `Origin` says who asked
 * (browsers send one with every CORS request; none with a navigation or a same-origin GET).
 */
function safeRequestFailure (request: FastifyRequest, allowedOrigins: ReadonlySet<string>): CsrfFailure | null {
  const purpose = request.headers['sec-purpose']
  if (typeof purpose === 'string' && PREFETCH.test(purpose)) return 'prefetch'
  if (isEmbeddedElsewhere(request)) return 'embedded'
  if (isScriptedNavigation(request)) return 'navigation'
  const origin = request.headers.origin
  return origin !== undefined && !allowedOrigins.has(origin) ? 'origin' : null
}

/**
 * The check for CORS_ORIGINS. Only requests that the browser's ambient cookie authenticates are
 * checked (a bearer header cannot be added by a cross-site form, and is never sent ambiently by a
 * browser): state-changing ones fully, safe ones for being prefetched, embedded by another origin's
 * page, navigated to by a same-site page without its user, or fetched by one outside CORS_ORIGINS.
 */
export function createCsrfCheck (allowedOrigins: ReadonlySet<string>): CsrfCheck {
  return function csrfCheck (request, transport) {
    if (transport !== 'cookie') return null
    // A safe method changes nothing, but an embedded or foreign one is refused before it counts (above).
    if (SAFE_METHODS.has(request.method)) return safeRequestFailure(request, allowedOrigins)
    return csrfFailure(request, allowedOrigins)
  }
}

async function csrf (app: FastifyInstance): Promise<void> {
  app.addHook('onRequest', function checkCsrf (request, _reply, done) {
    // The session hook decided it (createCsrfCheck), for the session the request acts in. A route
    // that authenticates no one (the mobile sign-in, which answers its token in the body and sets
    // no cookie; the IdP's back-channel logout; no route at all) uses no ambient credential a
    // forged request could abuse: a cookie sent along there, live or long stale, is not checked
    // (Duende BFF checks its session's API endpoints, not its sign-in).
    const failure = request.csrfFailure
    if (failure === null) {
      done()
      return
    }
    request.log.info({ csrf: failure }, 'CSRF check failed')
    done(csrfRejected())
  })
}

export const csrfPlugin = fp(csrf, { name: 'csrf', fastify: '5.x', dependencies: ['auth', 'web-security'] })
