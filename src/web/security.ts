import type { IncomingMessage, ServerResponse } from 'node:http'
import fp from 'fastify-plugin'
import helmet, { type HelmetOptions } from 'helmet'
import type { FastifyInstance, FastifyReply, FastifyRequest, onRequestHookHandler } from 'fastify'

/**
 * Browser-facing protections of a JSON API: security headers on every answer, and CORS with
 * credentials for the configured web origins only.
 */

/** Request headers a web app may send cross-origin; anything else fails the preflight. */
export const CORS_ALLOWED_HEADERS = ['content-type', 'x-csrf', 'idempotency-key', 'authorization', 'x-request-id']
/**
 * Answer headers a web app's script may read; WWW-Authenticate too: an app on another site calls
 * with a bearer, and its 401's challenge says whether the token was refused (sign in again).
 */
export const CORS_EXPOSED_HEADERS = ['x-request-id', 'retry-after', 'ratelimit', 'ratelimit-policy', 'idempotent-replayed', 'www-authenticate']
const CORS_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE']
/** How long a browser may cache a preflight's grant (seconds). */
const CORS_MAX_AGE = 600

/**
 * helmet's options for a JSON API: the headers of the OWASP REST Security Cheat Sheet (CSP with
 * frame-ancestors, HSTS, nosniff, X-Frame-Options), Referrer-Policy and CORP. Headers that only
 * act on documents a browser renders or on plug-ins are off: this service never answers HTML,
 * and each header is written on every answer.
 */
const HELMET: Readonly<HelmetOptions> = {
  // Nothing we answer is a document: it may load nothing, run nothing and be framed by no one.
  contentSecurityPolicy: {
    useDefaults: false,
    directives: { defaultSrc: ["'none'"], frameAncestors: ["'none'"], baseUri: ["'none'"], formAction: ["'none'"] }
  },
  // The public side is HTTPS (PUBLIC_URL); browsers ignore HSTS over plain http (loopback dev).
  // No includeSubDomains: the operator's other hosts are not ours to pin.
  strictTransportSecurity: { maxAge: 31_536_000, includeSubDomains: false },
  // The sign-in redirects carry an authorization code in the URL: never in a Referer.
  referrerPolicy: { policy: 'no-referrer' },
  // No other site may embed an answer (Spectre-style reads of no-cors responses).
  crossOriginResourcePolicy: { policy: 'same-origin' },
  xFrameOptions: { action: 'deny' },
  // Browsing-context and document isolation: no document here to isolate.
  crossOriginOpenerPolicy: false,
  originAgentCluster: false,
  // HTML prefetching, IE8 downloads, Flash and PDF cross-domain policies, the legacy XSS auditor.
  xDnsPrefetchControl: false,
  xDownloadOptions: false,
  xPermittedCrossDomainPolicies: false,
  xXssProtection: false
}

/**
 * The headers every answer carries, computed once: helmet's for these options (none of them
 * varies per request: no CSP nonces). They are recorded from one run of helmet's middleware on a
 * stand-in response, then copied onto each reply (here, and on the answers refused before any
 * route, answers.ts). @fastify/helmet would call `helmet(options)` again on every request, in two
 * hooks.
 */
export const SECURITY_HEADERS = answerHeaders()

function answerHeaders (): Readonly<Record<string, string>> {
  const headers: Record<string, string> = {}
  const recorder = {
    setHeader (name: string, value: string) { headers[name.toLowerCase()] = value },
    removeHeader (name: string) { delete headers[name.toLowerCase()] }
  }
  // helmet 8 throws on bad options rather than passing an error to `next`.
  helmet(HELMET)({} as IncomingMessage, recorder as unknown as ServerResponse, () => {})
  return Object.freeze(headers)
}

const CORS_METHODS_FIELD = CORS_METHODS.join(', ')
const CORS_ALLOWED_HEADERS_FIELD = CORS_ALLOWED_HEADERS.join(', ')
const CORS_EXPOSED_HEADERS_FIELD = CORS_EXPOSED_HEADERS.join(', ')

/**
 * Writes the CORS fields of the answer to `request` on `reply`; true when the request is an
 * OPTIONS request, which the caller answers with a bare 204. Shared by the hook below and by
 * Fastify's refusals before routing (answers.ts), which no hook sees: a web app must be able to
 * read those 400s too, and its preflight for such a path is answered like any other.
 */
export function applyCors (request: FastifyRequest, reply: FastifyReply, allowedOrigins: ReadonlySet<string>): boolean {
  const origin = request.headers.origin
  if (origin === undefined && request.method !== 'OPTIONS') return false
  // Whether an answer carries a grant depends on the Origin (Fetch, CORS protocol and HTTP
  // caches). Answers to requests without one (the mobile app's) are the same for everyone.
  if (origin !== undefined) reply.header('vary', 'Origin')
  const granted = origin !== undefined && allowedOrigins.has(origin)
  if (granted) {
    reply.header('access-control-allow-origin', origin)
    reply.header('access-control-allow-credentials', 'true')
  }
  if (request.method !== 'OPTIONS') {
    if (granted) reply.header('access-control-expose-headers', CORS_EXPOSED_HEADERS_FIELD)
    return false
  }
  if (granted && request.headers['access-control-request-method'] !== undefined) {
    reply.header('access-control-allow-methods', CORS_METHODS_FIELD)
    reply.header('access-control-allow-headers', CORS_ALLOWED_HEADERS_FIELD)
    reply.header('access-control-max-age', String(CORS_MAX_AGE))
  }
  return true
}

/** The bare 204 of an OPTIONS request; Safari waits for a body without an explicit length. */
export function answerOptions (reply: FastifyReply): void {
  reply.code(204).header('content-length', '0').send()
}

/**
 * CORS with credentials, for the exact origins configured (never a reflection of whatever Origin
 * came in). A request from an allowed origin gets the grant; any other gets none, which is how a
 * browser is told no. Every OPTIONS request is answered here, before the limits and any handler:
 * a preflight from an allowed origin with the methods and headers it may use, anything else with
 * a bare 204 (an OPTIONS request that is no preflight asks for nothing). Fastify's refusals
 * before routing, which no hook sees, get the same fields (answers.ts, frameworkErrorAnswer).
 *
 * Written here rather than with @fastify/cors: the policy is a set lookup, and the plugin's hook
 * copied its options, built closures and wrote three fields on every answer, also to the mobile
 * app's requests, which carry no Origin.
 */
function corsHook (allowedOrigins: ReadonlySet<string>): onRequestHookHandler {
  return function cors (request, reply, done) {
    if (applyCors(request, reply, allowedOrigins)) answerOptions(reply)
    else done()
  }
}

async function webSecurity (app: FastifyInstance): Promise<void> {
  // Synchronous: no promise per request for a copy of constant headers.
  app.addHook('onRequest', function applySecurityHeaders (_request, reply, done) {
    reply.headers(SECURITY_HEADERS)
    done()
  })
  app.addHook('onRequest', corsHook(app.config.corsOrigins))
}

export const webSecurityPlugin = fp(webSecurity, { name: 'web-security', fastify: '5.x', dependencies: ['answers'] })
