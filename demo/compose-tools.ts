import { once } from 'node:events'
import { createConnection, createServer, type Server } from 'node:net'
import { networkInterfaces } from 'node:os'
import process from 'node:process'
import { buildSandbox, DEMO_PATIENTS } from '../src/care360/sandbox.js'
import { DEMO_ACCOUNTS, startDevIdp } from '../src/web/dev-idp.js'
import { MOBILE_CLIENT } from './id-token.js'
import { buildPageServer } from './page-server.js'

/**
 * The development tools of docker-compose.yml, in one container whose network namespace the
 * service replicas and the load balancer share: the Care360 sandbox (4010), the development IdP
 * (4000) and the demo page (5173). The service accepts plain-http upstreams and issuers only on
 * loopback, so they all meet on this container's 127.0.0.1; the IdP, bound there, is also relayed
 * on the container's own addresses so that a browser reaches it through the published port at the
 * same URL (http://127.0.0.1:4000) the service uses. Never part of a production deployment.
 */

const env = process.env
if (env.NODE_ENV === 'production') {
  process.stderr.write('compose-tools refuses to run with NODE_ENV=production: it is the demo sandbox and a password-less IdP\n')
  process.exit(1)
}
function required (name: string): string {
  const value = env[name]
  if (value === undefined || value === '') {
    process.stderr.write(`${name} is required\n`)
    process.exit(1)
  }
  return value
}

const publicUrl = required('PUBLIC_URL')
const webAppUrl = env.WEB_APP_URL ?? 'http://localhost:5173'
const IDP_PORT = 4000
const SANDBOX_PORT = 4010
const PAGE_PORT = Number(new URL(webAppUrl).port || '5173')

const sandbox = await buildSandbox({ apiKey: required('SANDBOX_API_KEY'), seed: DEMO_PATIENTS, controlRoutes: true })
await sandbox.app.listen({ host: '0.0.0.0', port: SANDBOX_PORT })

const idp = await startDevIdp({
  publicUrl,
  // The replicas send it as the post-logout redirect URI: registered, or sign-out ends at an error page.
  webAppUrl,
  clientId: required('OIDC_CLIENT_ID'),
  clientSecret: required('OIDC_CLIENT_SECRET'),
  extraClients: [MOBILE_CLIENT],
  accounts: DEMO_ACCOUNTS,
  port: IDP_PORT
})

/** Relays TCP connections on the container's non-loopback addresses to the IdP on 127.0.0.1. */
async function relayIdp (): Promise<Server[]> {
  const servers: Server[] = []
  const addresses = Object.values(networkInterfaces()).flat()
    .filter((address) => address !== undefined && address.family === 'IPv4' && !address.internal)
  for (const address of addresses) {
    const server = createServer(function relay (client) {
      const upstream = createConnection({ host: '127.0.0.1', port: IDP_PORT })
      client.pipe(upstream).pipe(client)
      client.on('error', () => upstream.destroy())
      upstream.on('error', () => client.destroy())
    })
    server.listen(IDP_PORT, address?.address)
    await once(server, 'listening')
    servers.push(server)
  }
  return servers
}
const relays = await relayIdp()

const page = await buildPageServer({ apiUrl: publicUrl, sandboxUrl: `http://127.0.0.1:${SANDBOX_PORT}` })
await page.listen({ host: '0.0.0.0', port: PAGE_PORT })

process.stdout.write(`compose dev tools: IdP ${idp.url}, sandbox :${SANDBOX_PORT}, page ${webAppUrl}\n`)

async function stop (): Promise<void> {
  for (const relay of relays) relay.close()
  await Promise.allSettled([page.close(), idp.close(), sandbox.app.close()])
  process.exit(0)
}
process.once('SIGTERM', function onTerminate () { stop().catch(() => process.exit(1)) })
process.once('SIGINT', function onInterrupt () { stop().catch(() => process.exit(1)) })
