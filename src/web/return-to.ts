/**
 * Where a sign-in may send the browser afterwards: a path on the web app (WEB_APP_URL, default
 * PUBLIC_URL) and nothing else, so that
 * `/auth/login?returnTo=` can never be turned into an open redirect (RFC 9700 section 4.11).
 */

const MAX_LENGTH = 1024
/** C0 controls, DEL, and backslash (browsers read `/\evil.com` as `//evil.com`). */
// eslint-disable-next-line no-control-regex -- matching control characters is the point
const FORBIDDEN = /[\u0000-\u001f\u007f\\]/

function isLocalPath (path: string): boolean {
  return path.startsWith('/') && !path.startsWith('//') && !FORBIDDEN.test(path)
}

/**
 * `value` when it is a safe relative path, else `/`; written as a URL writes it (characters
 * outside ASCII percent-encoded), since it goes into a Location header.
 */
export function safeReturnTo (value: unknown): string {
  if (typeof value !== 'string' || value.length > MAX_LENGTH || !isLocalPath(value)) return '/'
  // As a browser resolves it: a path that stays on our origin, its dot segments (`%2e` too) gone.
  const base = 'https://bff.invalid'
  const resolved = new URL(value, base)
  if (resolved.origin !== base || !isSafeResult(resolved.pathname)) return '/'
  const result = `${resolved.pathname}${resolved.search}${resolved.hash}`
  // Percent-encoding can make it up to nine times longer: what leaves is bounded too (it is
  // sealed into the login cookie, which a browser drops beyond 4096 bytes, failing the sign-in).
  return result.length > MAX_LENGTH ? '/' : result
}

/**
 * A dot, a slash or a backslash, percent-encoded: what a router that decodes would resolve anew;
 * and the percent sign itself, so that no second decoding (`%252F` → `%2F` → `/`) makes one.
 */
const ENCODED_SEPARATOR = /%(25|2e|2f|5c)/i

/**
 * What leaves is checked, not only what came: no empty segment, no encoded dot, separator or
 * percent sign, and a local path once decoded, so that none of `/%2F%2Fevil.com`,
 * `/%2e/%2fevil.com` (which the parser resolves to `/%2fevil.com`), `/%2e%2e%2f%2fevil.com` (one
 * segment, `/..//evil.com` decoded) or `/%252F%252Fevil.com` (decoded twice) turns into
 * `//evil.com` in an app's router. A patient app's paths need none of them.
 */
function isSafeResult (path: string): boolean {
  if (path.includes('//') || ENCODED_SEPARATOR.test(path)) return false
  try {
    return isLocalPath(decodeURIComponent(path))
  } catch {
    return false
  }
}
