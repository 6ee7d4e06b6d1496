/**
 * The few parts of oidc-provider (no bundled types) that the development identity provider uses.
 * Only `dev-idp.ts` imports it; the service itself never does.
 */
declare module 'oidc-provider' {
  import type { IncomingMessage, ServerResponse } from 'node:http'

  export interface Interaction {
    uid: string
    prompt: { name: string }
    params: Record<string, unknown>
    session?: { accountId?: string }
    grantId?: string
  }

  export interface Grant {
    addOIDCScope: (scope: string) => void
    save: () => Promise<string>
  }

  export default class Provider {
    constructor (issuer: string, configuration: Record<string, unknown>)
    Grant: new (properties: { accountId: string, clientId: string }) => Grant
    proxy: boolean
    callback: () => (request: IncomingMessage, response: ServerResponse) => void
    interactionDetails: (request: IncomingMessage, response: ServerResponse) => Promise<Interaction>
    interactionFinished: (request: IncomingMessage, response: ServerResponse, result: Record<string, unknown>, options?: { mergeWithLastSubmission?: boolean }) => Promise<void>
    on: (event: string, listener: (...args: unknown[]) => void) => void
  }
}
