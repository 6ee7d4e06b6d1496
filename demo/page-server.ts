import { readFile } from 'node:fs/promises'
import Fastify, { type FastifyInstance } from 'fastify'

/**
 * The demo's patient web page, on its own origin (as a real web app would be): the browser talks
 * to the service cross-origin, so CORS, credentials and the session cookie are exercised for
 * real. Also relays the two sandbox controls the page offers (a failure mode, a reset), so that
 * the sandbox itself needs no CORS.
 */

const FILES = {
  '/': { file: 'index.html', type: 'text/html; charset=utf-8' },
  '/index.html': { file: 'index.html', type: 'text/html; charset=utf-8' },
  '/app.js': { file: 'app.js', type: 'text/javascript; charset=utf-8' },
  '/style.css': { file: 'style.css', type: 'text/css; charset=utf-8' }
} as const

export interface PageServerOptions {
  /** The service's public origin, which the page calls. */
  apiUrl: string
  /** The sandbox's origin, for the failure and reset relays. */
  sandboxUrl: string
}

export async function buildPageServer (options: PageServerOptions): Promise<FastifyInstance> {
  const app = Fastify({ logger: false, forceCloseConnections: true })
  const root = new URL('./web/', import.meta.url)
  const contents = new Map<string, Buffer>()
  for (const { file } of Object.values(FILES)) contents.set(file, await readFile(new URL(file, root)))

  app.addHook('onSend', async function pageHeaders (_request, reply) {
    reply.header('cache-control', 'no-store')
    // The page may call the service and itself, and run only its own script.
    reply.header('content-security-policy', `default-src 'self'; connect-src 'self' ${options.apiUrl}; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'`)
    reply.header('referrer-policy', 'no-referrer')
    reply.header('x-content-type-options', 'nosniff')
  })

  for (const [path, { file, type }] of Object.entries(FILES)) {
    app.get(path, async function servePageFile (_request, reply) {
      return reply.type(type).send(contents.get(file))
    })
  }

  app.get('/demo-config.json', async function demoConfig () {
    return { apiUrl: options.apiUrl }
  })

  async function relay (path: string, body: unknown): Promise<{ status: number, body: unknown }> {
    const response = await fetch(`${options.sandboxUrl}${path}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body ?? {}),
      signal: AbortSignal.timeout(5000)
    })
    return { status: response.status, body: await response.json() }
  }

  app.post('/demo/sandbox-failure', async function setSandboxFailure (request, reply) {
    const answer = await relay('/__sandbox/failure', request.body)
    return reply.code(answer.status).send(answer.body)
  })

  app.post('/demo/sandbox-reset', async function resetSandbox (_request, reply) {
    const answer = await relay('/__sandbox/reset', {})
    return reply.code(answer.status).send(answer.body)
  })

  return app
}
