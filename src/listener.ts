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
    http: { connectionsCheckingInterval: 1_000 }
  }
}

/** What Fastify's options cannot set. */
export function setHeadersTimeout (server: Server): void {
  server.headersTimeout = HEADERS_TIMEOUT_MS
}
