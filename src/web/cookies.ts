import { hash } from 'node:crypto'
import type { CookieSerializeOptions } from '@fastify/cookie'

/**
 * Cookie attributes of web sign-in. Both cookies carry the `__Host-` prefix, which makes browsers
 * refuse them unless they are Secure, Path=/ and without Domain: no sibling subdomain and no
 * plain-http hop can plant or read them. Secure is unconditional: behind a TLS-terminating load
 * balancer the hop to us is plain HTTP, but the browser's side is HTTPS, and that is what counts.
 */

export { SESSION_COOKIE } from '../auth/cookie.js'

/**
 * The sealed login state of one sign-in between `/auth/login` and `/auth/callback`: one cookie per
 * sign-in, named after its `state`, so that sign-ins begun in two tabs do not overwrite each other
 * and a callback finds (and clears) its own only.
 */
export const LOGIN_COOKIE_PREFIX = '__Host-bff-login-'

/** The login cookie's name for the sign-in of `state` (a hash: the name is a cookie token). */
export function loginCookieName (state: string): string {
  return `${LOGIN_COOKIE_PREFIX}${hash('sha256', state, 'base64url').slice(0, 16)}`
}

const LOGIN_COOKIE_NAME = new RegExp(`^${LOGIN_COOKIE_PREFIX}[A-Za-z0-9_-]{16}$`)

/** Whether `name` is one loginCookieName makes: any other is not ours (nor could be cleared). */
export function isLoginCookieName (name: string): boolean {
  return LOGIN_COOKIE_NAME.test(name)
}

/**
 * The most sign-ins one browser keeps under way: each is a cookie of up to about 2 KB sent with
 * every request to the service, and a new one ends the oldest beyond this.
 */
export const MAX_SIGN_INS_UNDER_WAY = 3

/** How long a sign-in at the identity provider may take. */
export const LOGIN_TTL_SEC = 600

/**
 * SameSite=Strict: the cookie is sent only on requests started from our own site, so no other
 * site can make a browser use it, whatever the method. The session is set in the answer to the
 * IdP's cross-site redirect, which browsers accept; the first document load after that redirect
 * does not carry it, but this service renders no pages: the app's own fetches do carry it.
 * No Max-Age: a browser-session cookie; the server enforces the idle and absolute lifetimes.
 */
export const SESSION_COOKIE_OPTIONS: CookieSerializeOptions = {
  path: '/',
  secure: true,
  httpOnly: true,
  sameSite: 'strict'
}

/**
 * SameSite=Lax: the IdP's redirect to `/auth/callback` is a cross-site top-level GET, on which a
 * Strict cookie would not be sent and every sign-in would fail. Lax is safe here: the cookie is
 * sealed, single-use, short-lived, and only binds the callback to the browser that started it.
 */
export const LOGIN_COOKIE_OPTIONS: CookieSerializeOptions = {
  path: '/',
  secure: true,
  httpOnly: true,
  sameSite: 'lax',
  maxAge: LOGIN_TTL_SEC
}
