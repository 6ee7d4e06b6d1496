import { lookup } from 'node:dns/promises'
import type { Server } from 'node:http'
import type { FastifyHttpOptions } from 'fastify'

/** How long a request has to arrive whole, headers and body (Node's requestTimeout). */
export const REQUEST_TIMEOUT_MS = 10_000

/** How long its headers may take (Node's headersTimeout). */
export const HEADERS_TIMEOUT_MS = 5_000

/** Above the 60 s idle timeout of common load balancers, so that they close first. */
export const KEEP_ALIVE_TIMEOUT_MS = 65_000

/**
 * The timeouts of a listener, the public one and the metrics one alike: a slow client is cut off
 * at every stage. The request must arrive within REQUEST_TIMEOUT_MS, its headers within
 * HEADERS_TIMEOUT_MS; once it has, the connection may stay silent for `idleMs` at most (Node's
 * `server.timeout`, reset by every byte either way), which bounds a client that stops reading its
 * answer: without it, nothing did, and such a connection held its socket and its unsent answer
 * for as long as the client wished. Between requests, a keep-alive connection has
 * KEEP_ALIVE_TIMEOUT_MS instead.
 */
export function listenerOptions (idleMs: number): Pick<FastifyHttpOptions<Server>, 'requestTimeout' | 'keepAliveTimeout' | 'connectionTimeout' | 'http'> {
  return {
    requestTimeout: REQUEST_TIMEOUT_MS,
    keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS,
    connectionTimeout: idleMs,
    // Node enforces headersTimeout and requestTimeout only when it checks its connections, every
    // 30 s by default: a slow client would keep its socket for up to 35 s instead of 5.
    http: {
      connectionsCheckingInterval: 1_000,
      // A request without Host is refused in the envelope (answers.ts, refusalBeforeRouting),
      // rather than with Node's bare 400.
      requireHostHeader: false
    }
  }
}

/** What Fastify's options cannot set. */
export function setHeadersTimeout (server: Server): void {
  server.headersTimeout = HEADERS_TIMEOUT_MS
}

/**
 * The address a listener binds for HOST. Given `localhost`, Fastify binds each address it resolves
 * to (127.0.0.1 and ::1), all but the first on servers of its own: what this service sets on
 * `app.server` (the drain, the headers timeout, the refusals before routing; app.ts) would not
 * reach them, and `close()` would not wait for their connections. So `localhost` binds its first
 * address, as Node does for any other name.
 */
export async function listenAddress (host: string): Promise<string> {
  return host === 'localhost' ? (await lookup(host)).address : host
}

/** The system's reasons a listener cannot start that the operator mends in HOST or the port's variable. */
const LISTEN_ERRORS: Record<string, { variable: 'HOST' | 'port', why: string }> = {
  EADDRINUSE: { variable: 'port', why: 'is in use' },
  EACCES: { variable: 'port', why: 'is not open to this process (a port under 1024 needs the privilege)' },
  EADDRNOTAVAIL: { variable: 'HOST', why: 'is not an address of this machine' },
  EAFNOSUPPORT: { variable: 'HOST', why: 'is of an address family this machine does not have' },
  ENOTFOUND: { variable: 'HOST', why: 'does not resolve' },
  EAI_AGAIN: { variable: 'HOST', why: 'could not be resolved (DNS did not answer)' }
}

/**
 * What start-up says when a listener cannot listen, as a configuration refusal does (config.ts,
 * ConfigError): one line naming the variable to mend (HOST, or the listener's port variable) with
 * the system's reason, where a stack trace said it only in the system's words. Null for any other
 * error (thrown on as it is).
 */
export function listenRefusal (error: unknown, portVariable: 'PORT' | 'METRICS_PORT', host: string, port: number): string | null {
  const code = (error as NodeJS.ErrnoException | null)?.code
  const known = code === undefined ? undefined : LISTEN_ERRORS[code]
  if (known === undefined) return null
  const line = known.variable === 'HOST'
    ? `HOST: ${host} ${known.why}`
    : `${portVariable}: ${port} on ${host} ${known.why}`
  return `Cannot listen:\n  ${line} (${code})`
}
