/**
 * Where a sign-in may send the browser afterwards: a path on this service and nothing else, so that
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
  // Checked once more decoded: `/%2F%2Fevil.com` must not become `//evil.com` in an app's router.
  let decoded: string
  try {
    decoded = decodeURIComponent(value)
  } catch {
    return '/'
  }
  if (!isLocalPath(decoded)) return '/'
  // And as a browser resolves it: a path that stays on our origin with no empty segment.
  const base = 'https://bff.invalid'
  const resolved = new URL(value, base)
  if (resolved.origin !== base || resolved.pathname.includes('//')) return '/'
  return `${resolved.pathname}${resolved.search}${resolved.hash}`
}
