import dns, { type LookupAddress } from 'node:dns'
import { syncBuiltinESMExports } from 'node:module'

/**
 * Preloaded into a server process (`--import`) by test/listener.test.ts: `localhost` resolves to
 * two addresses, 127.0.0.2 then 127.0.0.1 (both loopback on Linux), as it resolves to ::1 and
 * 127.0.0.1 on a machine with IPv6, which this one has not. The first is not 127.0.0.1, so that
 * binding "the first address" and binding 127.0.0.1 differ. Both lookups are replaced: the
 * promise one (listenAddress) and the callback one (Node's `listen`, and Fastify binding each
 * address of `localhost`). Any other name resolves as before.
 */
const addresses: LookupAddress[] = [{ address: '127.0.0.2', family: 4 }, { address: '127.0.0.1', family: 4 }]
type Callback = (error: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void
const wantsAll = (options: unknown): boolean => typeof options === 'object' && options !== null && (options as { all?: boolean }).all === true

const lookup = dns.lookup
const lookupPromise = dns.promises.lookup
Object.assign(dns, {
  lookup: function localhostTwoAddresses (host: string, options: unknown, callback?: Callback): void {
    if (host !== 'localhost') {
      Reflect.apply(lookup, dns, callback === undefined ? [host, options] : [host, options, callback])
      return
    }
    const done = (typeof options === 'function' ? options : callback) as Callback
    process.nextTick(() => { if (wantsAll(options)) done(null, addresses); else done(null, addresses[0]!.address, 4) })
  }
})
Object.assign(dns.promises, {
  lookup: async function localhostTwoAddresses (host: string, options?: unknown): Promise<LookupAddress | LookupAddress[]> {
    if (host !== 'localhost') return await Reflect.apply(lookupPromise, dns.promises, [host, options])
    return wantsAll(options) ? addresses : addresses[0]!
  }
})
// What `import { lookup } from 'node:dns/promises'` gives, in a module loaded after this one.
syncBuiltinESMExports()
