import t from 'tap'
import { buildTestApp } from '../helpers/app.js'
import { exchange, statuses } from './support.js'

/**
 * HOST_VALUE (answers.ts) against the grammar it cites: `uri-host [ ":" port ]` (RFC 9112, 3.2),
 * uri-host = IP-literal / IPv4address / reg-name (RFC 3986, 3.2.2), where reg-name is
 * `*( unreserved / pct-encoded / sub-delims )` and an IP-literal is never empty. Pinned member by
 * member (found by a mutation review: the sub-delims could be dropped from the pattern, and an
 * empty `[]` let in, with every other test passing).
 */
t.test('a reg-name of sub-delims is a host; an empty IP literal is not', async (t) => {
  const { app } = await buildTestApp(t, { env: { RATE_LIMIT_IP: '100000/1m' } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as { port: number }).port
  const served = async (host: string): Promise<number[]> =>
    statuses((await exchange(port, `GET /healthz HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`, 1000)).received)
  // Each sub-delim alone in a reg-name, and in an IP literal (IPvFuture allows them too).
  const hosts = ['!', '$', '&', "'", '(', ')', '*', '+', ',', ';', '='].flatMap((delim) => [`a${delim}b:8080`, `[v1.a${delim}b]`])
  const answers = await Promise.all(hosts.map(served))
  hosts.forEach((host, i) => { t.same(answers[i], [200], `Host: ${host} is a host`) })
  const empty = ['[]', '[]:80']
  const refused = await Promise.all(empty.map(served))
  empty.forEach((host, i) => { t.same(refused[i], [400], `Host: ${host} is no host`) })
})
