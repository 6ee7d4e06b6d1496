import type { IncomingMessage, ServerResponse } from 'node:http'
import fp from 'fastify-plugin'
import helmet, { type HelmetOptions } from 'helmet'
import cookie from '@fastify/cookie'
import cors from '@fastify/cors'
import type { FastifyInstance } from 'fastify'

/**
 * Browser-facing protections of a JSON API: security headers on every answer, cookie parsing for
 * the session cookie, and CORS with credentials for the configured web origins only.
 */

/** Request headers a web app may send cross-origin; anything else fails the preflight. */
export const CORS_ALLOWED_HEADERS = ['content-type', 'x-csrf', 'idempotency-key', 'authorization', 'x-request-id']
/** Answer headers a web app's script may read. */
export const CORS_EXPOSED_HEADERS = ['x-request-id', 'retry-after', 'ratelimit', 'ratelimit-policy', 'idempotent-replayed']

/** helmet's options for a JSON API. */
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
  crossOriginResourcePolicy: { policy: 'same-origin' },
  crossOriginOpenerPolicy: { policy: 'same-origin' },
  xFrameOptions: { action: 'deny' }
}

/**
 * The headers helmet sets for these options, computed once. Every one of them is the same for
 * every answer (no CSP nonces, no per-request directives), so they are recorded from one run of
 * helmet's middleware on a stand-in response and then copied onto each reply. @fastify/helmet
 * would call `helmet(options)` again on every request, re-parsing the options each time, in two
 * hooks: a measurable share of the CPU a whole cancel costs.
 */
function securityHeaders (): Readonly<Record<string, string>> {
  const headers: Record<string, string> = {}
  const recorder = {
    setHeader (name: string, value: string) { headers[name.toLowerCase()] = value },
    removeHeader (name: string) { delete headers[name.toLowerCase()] }
  }
  // helmet 8 throws on bad options rather than passing an error to `next`.
  helmet(HELMET)({} as IncomingMessage, recorder as unknown as ServerResponse, () => {})
  return Object.freeze(headers)
}

async function webSecurity (app: FastifyInstance): Promise<void> {
  const headers = securityHeaders()
  // Synchronous: no promise per request for a copy of constant headers.
  app.addHook('onRequest', function applySecurityHeaders (_request, reply, done) {
    reply.headers(headers)
    done()
  })
  await app.register(cookie, { hook: 'onRequest' })
  await app.register(cors, {
    // Exact origins only (config normalises them), never a reflection of whatever Origin came in.
    origin: app.config.corsOrigins,
    credentials: true,
    methods: ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'],
    allowedHeaders: CORS_ALLOWED_HEADERS,
    exposedHeaders: CORS_EXPOSED_HEADERS,
    maxAge: 600,
    // An OPTIONS request without preflight headers gets a plain 204 rather than the plugin's
    // 400 text/plain, which would be an answer outside the envelope.
    strictPreflight: false
  })
}

export const webSecurityPlugin = fp(webSecurity, { name: 'web-security', fastify: '5.x', dependencies: ['answers'] })
