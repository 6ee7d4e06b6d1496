import t from 'tap'
import { cancelOnSocket, exchange, statuses } from './support.js'

/** Host values real clients send must not be refused by HOST_VALUE (answers.ts). */
// A link-local IPv6 with its zone, as Node's own http client writes it for
// http.get({ host: 'fe80::1%eth0' }) (the other forms pass: trailing dot, upper case, empty, _).
const hosts = ['[fe80::1%eth0]:3000', '[fe80::1%25eth0]:3000']
for (const host of hosts) {
  t.test(`Host: ${JSON.stringify(host)} is served`, async (t) => {
    const { port } = await cancelOnSocket(t)
    const { received } = await exchange(port, `GET /healthz HTTP/1.1\r\nHost: ${host}\r\n\r\n`, 500)
    t.same(statuses(received), [200])
  })
}
