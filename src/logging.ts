import type { FastifyServerOptions } from 'fastify'
import type { DestinationStream } from 'pino'
import type { Config } from './config.js'

/**
 * What may never reach a log line: the key, session tokens, cookies, ID tokens, authorization
 * codes, patient emails and cancellation reasons. The request serializer logs the path without
 * its query (the sign-in callback carries a code there); the paths below catch the rest wherever
 * an object carrying them is logged by mistake.
 */
export const REDACT_PATHS = [
  'req.headers.authorization',
  'req.headers.cookie',
  'req.headers["cv-api-key"]',
  'res.headers["set-cookie"]',
  'headers.authorization',
  'headers.cookie',
  'headers["cv-api-key"]',
  'headers["set-cookie"]',
  '*.apiKey',
  '*.token',
  '*.idToken',
  '*.id_token',
  '*.email',
  '*.reason',
  'apiKey',
  'token',
  'idToken',
  'email',
  'reason'
]

type SerializedRequest = { method: string, url: string, remoteAddress?: string }

export function loggerOptions (config: Config, stream?: DestinationStream): NonNullable<FastifyServerOptions['logger']> {
  return {
    level: config.logLevel,
    ...(stream === undefined ? {} : { stream }),
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    serializers: {
      req: function serializeRequest (request: { method: string, url: string, ip?: string }): SerializedRequest {
        return { method: request.method, url: request.url.split('?', 1)[0] as string, remoteAddress: request.ip }
      },
      res: function serializeReply (reply: { statusCode: number }) {
        return { statusCode: reply.statusCode }
      }
    }
  }
}
