import { startDevIdp, type DevIdp, type DevIdpOptions } from '../../src/web/dev-idp.js'

export { DEMO_ACCOUNTS, type DevIdp } from '../../src/web/dev-idp.js'

interface TeardownHost { teardown: (fn: () => unknown) => void }

/** The development OpenID Provider on a loopback port, closed when the test ends. */
export async function startTestIdp (t: TeardownHost, options: DevIdpOptions): Promise<DevIdp> {
  const idp = await startDevIdp({ clientSecret: 'test-web-client-secret-0123456789', ...options })
  t.teardown(() => idp.close())
  return idp
}
