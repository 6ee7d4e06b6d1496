import type { FastifyRequest } from 'fastify'
import { sessionCookieOf } from './cookie.js'

export type SessionTransport = 'bearer' | 'cookie'

const BEARER = /^bearer[ \t]+([^ \t]+)[ \t]*$/i

/**
 * The session token of a request: the Authorization header when it carries a bearer, else the
 * cookie. A bearer header that is present wins even when it is bad, so a request never silently
 * falls back to the ambient cookie (and to the cookie's weaker, CSRF-exposed transport). The
 * session hook asks it and records the transport (`request.sessionTransport`), which the CSRF
 * check reads, so the two cannot disagree.
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
