/**
 * The web session cookie. `__Host-` makes browsers refuse it unless it is Secure, has Path=/ and no
 * Domain, so no sibling subdomain can plant or read it. Its value is the same opaque session token
 * a mobile app sends as a bearer; the cookie plugin and its attributes come with web sign-in.
 */
export const SESSION_COOKIE = '__Host-bff-session'
