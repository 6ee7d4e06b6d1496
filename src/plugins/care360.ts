import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { createCare360Client, type Care360Client, type UpstreamGate } from '../care360/client.js'

declare module 'fastify' {
  interface FastifyInstance {
    care360: Care360Client
  }
}

export interface Care360PluginOptions {
  /** The org budget and shared cooldown every upstream call passes. */
  gate: UpstreamGate
}

/** The upstream client of this process: one pool, closed when the app closes. */
async function care360 (app: FastifyInstance, options: Care360PluginOptions): Promise<void> {
  const { baseUrl, apiKey, timeoutMs } = app.config.care360
  const client = createCare360Client({ baseUrl, apiKey, timeoutMs, gate: options.gate, observe: app.metrics.observeUpstream })
  app.decorate('care360', client)
  app.addHook('onClose', async function closeCare360Pool () { await client.close() })
}

export const care360Plugin = fp(care360, { name: 'care360', fastify: '5.x', dependencies: ['metrics'] })
