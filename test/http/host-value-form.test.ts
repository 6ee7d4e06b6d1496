import t, { type Test } from 'tap'
import { buildTestApp } from '../helpers/app.js'
import { exchange, statuses } from './support.js'

/**
 * README (errors table): a request whose Host "value is no host" is refused 400, as RFC 9112, 3.2
 * requires ("a Host header field with an invalid field value"). The value is `uri-host [ ":" port ]`,
 * uri-host = IP-literal / IPv4address / reg-name (RFC 3986, 3.2.2). One app, a real socket per Host.
 */
t.test('the Host value\'s form', async (t) => {
  const { app } = await buildTestApp(t, { env: { RATE_LIMIT_IP: '100000/1m' } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as { port: number }).port
  // `Connection: close`: the exchange ends when the service closes, right after its answer. The
  // silence it waits for otherwise only ends an exchange that fails anyway (no answer); it is
  // long: up to 22 connections are opened at once, and a loaded machine may take more than the
  // second it was to answer the last of them.
  const answer = async (host: string): Promise<number[]> =>
    statuses((await exchange(port, `GET /healthz HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`, 10_000)).received)
  const check = async (t: Test, hosts: string[], status: number, what: string): Promise<void> => {
    const answers = await Promise.all(hosts.map(answer))
    hosts.forEach((host, i) => { t.same(answers[i], [status], `Host: ${host} ${what}`) })
  }

  // HOST_VALUE (answers.ts) took the characters of a host, not its form: a `%` not followed by two
  // hex digits (pct-encoded), and anything in brackets (`[zzz]`, `[1.2.3.4]`), none of them an
  // IP-literal (IPv6address, with a zone, or IPvFuture), were served 200.
  t.test('host characters in no host\'s form are refused 400', async (t) => {
    await check(t, ['a%', '%zz', 'a%2', '[zzz]', '[1.2.3.4]', '[:::::]', '[v.]', '[vz.a]', '[v1.]', '[fe80::1%]', '[zzz%eth0]', '[fe80::1%e/0]', '[fe80::1%25en%zz]', '[fe80::1%en%2]', '[::1]:80:80'], 400, 'is no host')
    await check(t, ['a%2Eb', '%C3%A9.example:80', '[::ffff:1.2.3.4]', '[fe80::1%eth0]', '[fe80::1%25eth0]:3000', '[fe80::1%25en%2F0]', '[vF.a:b]', '[::1]'], 200, 'is a host')
  })

  // reg-name is `*( unreserved / pct-encoded / sub-delims )` and an IP-literal is never empty.
  // Pinned member by member (found by a mutation review: the sub-delims could be dropped from the
  // pattern, and an empty `[]` let in, with every other test passing).
  t.test('a reg-name of sub-delims is a host; an empty IP literal is not', async (t) => {
    // Each sub-delim alone in a reg-name, and in an IP literal (IPvFuture allows them too).
    await check(t, ['!', '$', '&', "'", '(', ')', '*', '+', ',', ';', '='].flatMap((delim) => [`a${delim}b:8080`, `[v1.a${delim}b]`]), 200, 'is a host')
    await check(t, ['[]', '[]:80'], 400, 'is no host')
  })

  // IPvFuture is `"v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )`, and an ABNF string is
  // case-insensitive (RFC 5234, 2.3; RFC 3986, 1.3): `[V1.x]` is as much a host as `[v1.x]`, and
  // its HEXDIG either case. IP_LITERAL (answers.ts) took only the lower-case `v`.
  t.test('an IPvFuture literal is a host whatever the case of its "v"', async (t) => {
    await check(t, ['[v1.x]', '[V1.x]', '[VF.a:b]:8080', '[vAb.c]'], 200, 'is a host')
    await check(t, ['[V.x]', '[Vg.x]', '[V1.]'], 400, 'is no host')
  })
})
