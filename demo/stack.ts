import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { createServer } from 'node:net'
import type { FastifyInstance } from 'fastify'
import { buildApp } from '../src/app.js'
import { loadConfig } from '../src/config.js'
import { buildSandbox, DEMO_PATIENTS, type SandboxControl, type SeedPatient } from '../src/care360/sandbox.js'
import { DEMO_ACCOUNTS, startDevIdp, type DevAccount, type DevIdp } from '../src/web/dev-idp.js'
import { MOBILE_CLIENT, MOBILE_CLIENT_ID } from './id-token.js'
import { buildPageServer } from './page-server.js'
import { DEFAULT_PORTS, PORT_VARIABLES, type DemoPorts } from './ports.js'

/**
 * The whole demo on loopback: the Care360 sandbox, the development IdP, the service on in-memory
 * state and the patient web page. `demo/main.ts` runs it on fixed ports; tests on free ones.
 * Never imported by `src/`: production builds and `npm start` cannot reach it.
 */

export { DEFAULT_PORTS, PORT_VARIABLES, type DemoPorts }

export interface DemoOptions {
  /** 0 picks a free port. */
  ports?: Partial<DemoPorts>
  /** The service's pino level (default `warn`: the demo's own output stays readable). */
  logLevel?: string
  /** Extra service variables (e.g. tighter limits in a test). */
  env?: Record<string, string>
}

export interface DemoUrls {
  page: string
  service: string
  idp: string
  sandbox: string
}

export interface Demo {
  urls: DemoUrls
  patients: readonly SeedPatient[]
  accounts: readonly DevAccount[]
  /** The sandbox's key, as the service's CV_API_KEY (a demo value, not a secret). */
  sandboxKey: string
  mobileClientId: string
  service: FastifyInstance
  /** What the sandbox received, and its failure switches (tests). */
  sandbox: SandboxControl
  close: () => Promise<void>
}

/** A port already taken, named with the variable that moves it. */
export class DemoPortInUseError extends Error {
  constructor (readonly part: keyof DemoPorts, readonly port: number) {
    super(`Port ${port} (${part}) is already in use: stop what uses it, or set ${PORT_VARIABLES[part]} to another port.`)
    this.name = 'DemoPortInUseError'
  }
}

function inUse (error: unknown): boolean {
  return (error as NodeJS.ErrnoException | null)?.code === 'EADDRINUSE'
}

/** Whether `port` can be listened on, on both loopback addresses `localhost` may resolve to. */
async function assertFree (part: keyof DemoPorts, port: number): Promise<number> {
  for (const host of ['127.0.0.1', '::1']) {
    const server = createServer()
    try {
      server.listen({ port, host, exclusive: true })
      await once(server, 'listening')
      if (port === 0) port = (server.address() as { port: number }).port
    } catch (error) {
      // A machine without IPv6 loopback cannot bind ::1: only 127.0.0.1 matters there.
      if (inUse(error)) throw new DemoPortInUseError(part, port)
      if (host === '127.0.0.1') throw error
    } finally {
      if (server.listening) {
        server.close()
        await once(server, 'close')
      }
    }
  }
  return port
}

export async function startDemo (options: DemoOptions = {}): Promise<Demo> {
  const ports = { ...DEFAULT_PORTS, ...options.ports }
  const closers: Array<() => Promise<void>> = []
  async function close (): Promise<void> {
    // Reverse order: the service first, so it stops calling the IdP and the sandbox.
    for (const closer of closers.splice(0).reverse()) {
      try { await closer() } catch { /* closing anyway */ }
    }
  }

  try {
    const sandboxKey = `demo-${randomBytes(12).toString('hex')}`
    const sandbox = await buildSandbox({ apiKey: sandboxKey, seed: DEMO_PATIENTS, controlRoutes: true })
    closers.push(() => sandbox.app.close())
    await listen(sandbox.app, 'sandbox', '127.0.0.1', ports.sandbox)
    const sandboxUrl = `http://127.0.0.1:${(sandbox.app.server.address() as { port: number }).port}`

    // The service's port is needed before it listens: PUBLIC_URL, the IdP's redirect URIs and
    // the page's calls all name it. A free one is chosen now when asked for 0.
    const servicePort = await assertFree('service', ports.service)
    const serviceUrl = `http://localhost:${servicePort}`

    const page = await buildPageServer({ apiUrl: serviceUrl, sandboxUrl })
    closers.push(() => page.close())
    // `localhost`, like the service: the page and the service are then the same site (cookies
    // are sent on the page's calls) but different origins (CORS applies).
    await listen(page, 'page', 'localhost', ports.page)
    const pageUrl = `http://localhost:${(page.server.address() as { port: number }).port}`

    let idp: DevIdp
    try {
      idp = await startDevIdp({ publicUrl: serviceUrl, webAppUrl: pageUrl, port: ports.idp, extraClients: [MOBILE_CLIENT], accounts: DEMO_ACCOUNTS })
    } catch (error) {
      if (inUse(error)) throw new DemoPortInUseError('idp', ports.idp)
      throw error
    }
    closers.push(() => idp.close())

    const config = loadConfig({
      CV_API_KEY: sandboxKey,
      CV_BASE_URL: sandboxUrl,
      OIDC_ISSUER: idp.url,
      OIDC_CLIENT_ID: idp.clientId,
      OIDC_CLIENT_SECRET: idp.clientSecret,
      OIDC_AUDIENCES: `${idp.clientId},${MOBILE_CLIENT_ID}`,
      PUBLIC_URL: serviceUrl,
      WEB_APP_URL: pageUrl,
      HOST: 'localhost',
      PORT: String(servicePort),
      METRICS_PORT: '0',
      LOG_LEVEL: options.logLevel ?? 'warn',
      ...options.env
    })
    const service = await buildApp(config)
    closers.push(async () => {
      service.draining = true
      await service.close()
    })
    await listen(service, 'service', 'localhost', servicePort)

    return {
      urls: { page: pageUrl, service: serviceUrl, idp: idp.url, sandbox: sandboxUrl },
      patients: DEMO_PATIENTS,
      accounts: DEMO_ACCOUNTS,
      sandboxKey,
      mobileClientId: MOBILE_CLIENT_ID,
      service,
      sandbox: sandbox.control,
      close
    }
  } catch (error) {
    await close()
    throw error
  }
}

async function listen (app: FastifyInstance, part: keyof DemoPorts, host: string, port: number): Promise<void> {
  try {
    await app.listen({ host, port })
  } catch (error) {
    if (inUse(error)) throw new DemoPortInUseError(part, port)
    throw error
  }
}
