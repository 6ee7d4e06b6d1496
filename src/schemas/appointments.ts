import { Type, type Static } from 'typebox'
import { ErrorEnvelope } from '../errors.js'

/** Any UUID version, either case: the upstream's ids (`id` and `agentEventId`) are UUID-shaped. */
export const UUID_PATTERN = '^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$'

export const CancelParams = Type.Object({
  id: Type.String({ pattern: UUID_PATTERN, description: 'the appointment id (or its agentEventId), a UUID' })
}, { additionalProperties: false })

export const CancelBody = Type.Object({
  reason: Type.Optional(Type.String({
    // JSON Schema counts Unicode code points; control characters other than tab, LF and CR
    // (C0, DEL and C1) are refused.
    maxLength: 500,
    pattern: '^[^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F\\u007F-\\u009F]*$',
    description: 'why the patient cancels; at most 500 characters'
  }))
}, { additionalProperties: false })

export type CancelBody = Static<typeof CancelBody>

export const CancelAnswer = Type.Object({
  status: Type.Integer(),
  success: Type.Boolean(),
  message: Type.String()
}, { additionalProperties: false })

/** What a patient app needs of an appointment, and nothing more of the upstream's record. */
export const PatientAppointment = Type.Object({
  id: Type.String(),
  agentEventId: Type.Union([Type.String(), Type.Null()]),
  title: Type.Union([Type.String(), Type.Null()]),
  topic: Type.Union([Type.String(), Type.Null()]),
  start: Type.Union([Type.String(), Type.Null()]),
  end: Type.Union([Type.String(), Type.Null()]),
  status: Type.Union([Type.String(), Type.Null()]),
  agentName: Type.Union([Type.String(), Type.Null()])
}, { additionalProperties: false })

export const AppointmentList = Type.Object({
  status: Type.Integer(),
  success: Type.Literal(true),
  message: Type.String(),
  data: Type.Array(PatientAppointment)
})

/** Error answers a session route may give, for the OpenAPI document. */
export const errorAnswers = (...statuses: number[]): Record<number, typeof ErrorEnvelope> =>
  Object.fromEntries(statuses.map((status) => [status, ErrorEnvelope]))
