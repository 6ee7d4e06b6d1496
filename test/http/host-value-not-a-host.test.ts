import t from 'tap'
import { buildTestApp } from '../helpers/app.js'
import { exchange, statuses } from './support.js'

/**
 * README (errors table): a request whose Host "value is no host" is refused 400, as RFC 9112, 3.2
 * requires ("a Host header field with an invalid field value"). HOST_VALUE (answers.ts) took the
 * characters of a host, not its form: a `%` not followed by two hex digits (RFC 3986 pct-encoded),
 * and anything in brackets (`[zzz]`, `[1.2.3.4]`), none of them an IP-literal (IPv6address, with a
 * zone, or IPvFuture), were served 200.
 */
t.test('a Host of host characters in no host\'s form is refused 400', async (t) => {
  const { app } = await buildTestApp(t, { env: { RATE_LIMIT_IP: '100000/1m' } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as { port: number }).port
  const answer = async (host: string): Promise<number[]> =>
    statuses((await exchange(port, `GET /healthz HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`, 1000)).received)
  const check = async (hosts: string[], status: number, what: string): Promise<void> => {
    const answers = await Promise.all(hosts.map(answer))
    hosts.forEach((host, i) => { t.same(answers[i], [status], `Host: ${host} ${what}`) })
  }
  await check(['a%', '%zz', 'a%2', '[zzz]', '[1.2.3.4]', '[:::::]', '[v.]', '[vz.a]', '[v1.]', '[fe80::1%]', '[zzz%eth0]', '[fe80::1%e/0]', '[::1]:80:80'], 400, 'is no host')
  await check(['a%2Eb', '%C3%A9.example:80', '[::ffff:1.2.3.4]', '[fe80::1%eth0]', '[fe80::1%25eth0]:3000', '[fe80::1%25en%2F0]', '[vF.a:b]', '[::1]'], 200, 'is a host')
})
