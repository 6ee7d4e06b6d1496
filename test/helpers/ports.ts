import { createServer } from 'node:net'
import { once } from 'node:events'

/**
 * A loopback port that was free a moment ago: for a server a test starts itself (redis-server, a
 * child process), or as a port where nothing listens. Bound and released, so a race is possible
 * but harmless on a test machine.
 */
export async function freePort (): Promise<number> {
  const server = createServer()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address() as { port: number }
  server.close()
  await once(server, 'close')
  return port
}
