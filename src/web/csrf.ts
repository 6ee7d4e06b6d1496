import fp from 'fastify-plugin'
import { presentedToken } from '../auth/plugin.js'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import { ApiError, ErrorCode } from '../errors.js'

/**
 * CSRF protection for cookie sessions, as one global hook so that no route can forget it (the
 * Duende BFF pattern: a static `X-CSRF: 1` header, which a cross-site form or a "simple" request
 * cannot carry, and which a cross-origin script can only send after a CORS preflight that only
 * CORS_ORIGINS pass). Registered after the session hook, so it knows how the session arrived.
 */

/** Methods that change nothing (RFC 9110 section 9.2.1); every other method is checked. */
const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS'])

export type CsrfFailure = 'cross-site' | 'header' | 'origin'

export const csrfRejected = (): ApiError =>
  new ApiError(403, ErrorCode.CSRF_REJECTED, 'Cross-site request refused: send X-CSRF: 1 from an allowed origin')

/**
 * Whether the browser's ambient cookie is what authenticates this request: a cookie session, or,
 * on a route that resolves no session, the session cookie without a bearer header. A bearer header
 * cannot be added by a cross-site form, and is never sent ambiently by a browser.
 */
function usesAmbientCookie (request: FastifyRequest): boolean {
  if (request.sessionTransport !== null) return request.sessionTransport === 'cookie'
  return presentedToken(request)?.transport === 'cookie'
}

/** Why the request fails the check, or null when it passes. */
export function csrfFailure (request: FastifyRequest, allowedOrigins: ReadonlySet<string>): CsrfFailure | null {
  // Fetch Metadata: a browser says outright when another site started the request.
  if (request.headers['sec-fetch-site'] === 'cross-site') return 'cross-site'
  if (request.headers['x-csrf'] !== '1') return 'header'
  const origin = request.headers.origin
  if (origin !== undefined && !allowedOrigins.has(origin)) return 'origin'
  return null
}

async function csrf (app: FastifyInstance): Promise<void> {
  const allowedOrigins = new Set(app.config.corsOrigins)
  // Synchronous: it decides from the headers alone, so no promise per request.
  app.addHook('onRequest', function checkCsrf (request, _reply, done) {
    const failure = SAFE_METHODS.has(request.method) || !usesAmbientCookie(request) ? null : csrfFailure(request, allowedOrigins)
    if (failure === null) {
      done()
      return
    }
    request.log.info({ csrf: failure }, 'CSRF check failed')
    done(csrfRejected())
  })
}

export const csrfPlugin = fp(csrf, { name: 'csrf', fastify: '5.x', dependencies: ['auth', 'web-security'] })
