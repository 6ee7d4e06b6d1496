import { createServer, type AddressInfo, type Server } from 'node:net'
import type { ServerResponse } from 'node:http'
import { once } from 'node:events'
import { readFileSync } from 'node:fs'
import { randomInt } from 'node:crypto'

/** Below this, ports are left to the machine's own services (PostgreSQL, Redis on 6379, ...). */
const LOWEST = 10_000

/**
 * The first port of the kernel's ephemeral range, from which every outgoing connection (a Redis
 * client, fetch, undici) and every listen on port 0 takes its local port.
 */
function ephemeralStart (): number {
  try {
    const low = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0])
    /* c8 ignore next: a kernel whose ephemeral range starts too low to leave room below it */
    return Number.isInteger(low) && low > LOWEST + 1000 ? low : 32_768
  } catch {
    /* c8 ignore next: not Linux */
    return 32_768
  }
}

async function isFree (port: number): Promise<boolean> {
  const server = createServer()
  server.listen(port, '127.0.0.1')
  try {
    await once(server, 'listening')
  } catch {
    return false
  }
  server.close()
  await once(server, 'close')
  return true
}

/**
 * A loopback port that was free a moment ago: for a server that must know its port before it
 * listens (redis-server, a child process, an app whose public URL names its port, a Redis that is
 * restarted on its port), or as a port where nothing listens.
 *
 * Taken below the ephemeral range: a port from that range can be taken by any outgoing connection
 * of the test run between this check and the listen (seen in CI: EADDRINUSE on the web stack's
 * port). Below it, only another test's explicit listen could take it, which random choice makes
 * rare.
 */
export async function freePort (): Promise<number> {
  const high = ephemeralStart()
  for (let attempt = 0; attempt < 100; attempt++) {
    const port = randomInt(LOWEST, high)
    if (await isFree(port)) return port
  }
  /* c8 ignore next: a hundred ports in use in a row */
  throw new Error('no free port below the ephemeral range')
}

/**
 * Listens `server` (a stub upstream: node:net, node:http or node:https) on a port of loopback the
 * system picks, for the length of the test: at its end the server closes with its connections.
 * Gives the port.
 */
export async function listenOnLoopback (t: { teardown: (fn: () => unknown) => void }, server: Server & { closeAllConnections?: () => void }): Promise<number> {
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.teardown(async () => {
    if (!server.listening) return
    server.closeAllConnections?.()
    server.close()
    await once(server, 'close')
  })
  return (server.address() as AddressInfo).port
}

/**
 * A stub upstream's JSON answer, unless its client has gone (the service gave up on the call):
 * then there is nobody to answer.
 */
export function answerJson (response: ServerResponse, status: number, body: object): void {
  if (response.destroyed) return
  response.writeHead(status, { 'content-type': 'application/json' })
  response.end(JSON.stringify(body))
}
