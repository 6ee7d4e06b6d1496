import { fastifyCookie } from '@fastify/cookie'

/**
 * The web session cookie. `__Host-` makes browsers refuse it unless it is Secure, has Path=/ and no
 * Domain, so no sibling subdomain can plant or read it. Its value is the same opaque session token
 * a mobile app sends as a bearer; the cookie plugin and its attributes come with web sign-in.
 */
export const SESSION_COOKIE = '__Host-bff-session'

/**
 * The session cookie of a request, read from its Cookie header when asked: the session hook (and
 * sign-out's 401) ask only when no bearer came, and most requests (the mobile app's) carry no cookies at
 * all, so nothing is parsed for them. The routes that set or read other cookies (web sign-in,
 * sign-out) register @fastify/cookie in their own scope.
 */
export function sessionCookieOf (cookieHeader: string | undefined): string | undefined {
  if (cookieHeader === undefined || !cookieHeader.includes(SESSION_COOKIE)) return undefined
  return fastifyCookie.parse(cookieHeader)[SESSION_COOKIE]
}
