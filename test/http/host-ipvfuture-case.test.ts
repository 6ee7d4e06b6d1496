import t from 'tap'
import { buildTestApp } from '../helpers/app.js'
import { exchange, statuses } from './support.js'

/**
 * IPvFuture is `"v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )` (RFC 3986, 3.2.2), and an
 * ABNF string is case-insensitive (RFC 5234, 2.3; RFC 3986, 1.3): `[V1.x]` is as much a host as
 * `[v1.x]`, and its HEXDIG either case. IP_LITERAL (answers.ts) took only the lower-case `v`.
 */
t.test('an IPvFuture literal is a host whatever the case of its "v"', async (t) => {
  const { app } = await buildTestApp(t, { env: { RATE_LIMIT_IP: '100000/1m' } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as { port: number }).port
  const served = async (host: string): Promise<number[]> =>
    statuses((await exchange(port, `GET /healthz HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`, 1000)).received)
  for (const host of ['[v1.x]', '[V1.x]', '[VF.a:b]:8080', '[vAb.c]']) t.same(await served(host), [200], `Host: ${host} is a host`)
  for (const host of ['[V.x]', '[Vg.x]', '[V1.]']) t.same(await served(host), [400], `Host: ${host} is no host`)
})
