import { hasEnded, type Appointment } from '../care360/client.js'

/**
 * Which upcoming appointments belong to which patient, as the upstream's Fetch Appointments
 * says, cached briefly per process. The cache only saves list calls (and org budget): an
 * appointment missing from a cached list is looked up again fresh before we say "not yours",
 * a cancel that took effect drops that appointment from the patient's entry, and an outcome that
 * may have cancelled evicts the entry (one known not to have been sent leaves it), so staleness can delay a 404 but never turn one into a cancel of
 * someone else's appointment (the list is always the patient's own).
 */
export interface OwnershipCacheOptions {
  fetch: (email: string, requestId: string) => Promise<Appointment[]>
  ttlMs?: number
  maxEntries?: number
  now?: () => number
}

interface Entry { at: number, appointments: Appointment[] }

export interface OwnershipCache {
  /** The patient's list, fetched now (GET /appointments), and kept so a following cancel can use it. */
  list: (email: string, requestId: string) => Promise<Appointment[]>
  /** The appointment among the patient's own, matching `id` or `agentEventId` (any case). */
  find: (email: string, appointmentId: string, requestId: string) => Promise<Appointment | null>
  /** Like `find`, but always from a fresh list: for deciding whether a cancel took effect. */
  findFresh: (email: string, appointmentId: string, requestId: string) => Promise<Appointment | null>
  /** After a cancel that took effect: the patient's list stays cached, without that appointment. */
  cancelled: (email: string, appointment: Appointment) => void
  /** After an outcome that may have cancelled: the patient's next cancel fetches a list afresh. */
  forget: (email: string) => void
}

/**
 * Which of an appointment's identifiers `appointmentId` names (its `id` or its `agentEventId`, in
 * any case), spelled as the upstream lists it; null when neither.
 */
export function listedIdOf (item: Appointment, appointmentId: string): string | null {
  const wanted = appointmentId.toLowerCase()
  if (item.id.toLowerCase() === wanted) return item.id
  if (item.agentEventId?.toLowerCase() === wanted) return item.agentEventId
  return null
}

/** The appointment a cancel names, by its `id` or its `agentEventId`, in any case. */
export function findAppointment (list: Appointment[], appointmentId: string): Appointment | null {
  return list.find((item) => listedIdOf(item, appointmentId) !== null) ?? null
}

export function createOwnershipCache (options: OwnershipCacheOptions): OwnershipCache {
  const ttlMs = options.ttlMs ?? 30_000
  const maxEntries = options.maxEntries ?? 10_000
  const now = options.now ?? Date.now
  // Keyed by the lower-cased email: the upstream matches emails case-insensitively.
  const entries = new Map<string, Entry>()
  // The ids of the appointments a cancel took effect for lately, by patient, for as long as a
  // cached list lives: a list fetched before such a cancel but stored after it (a GET
  // /appointments, or another cancel's lookup, running meanwhile) must not bring one back. A set:
  // the same appointment cancelled again and again (keys, retries) is one entry.
  const gone = new Map<string, { at: number, ids: Set<string> }>()
  // An outcome that may have cancelled some appointment of the patient's (which one the list would
  // have to say) forgets their list; one fetched before it and stored after would then serve the
  // next cancel for up to ttlMs. So each fetch notes how many forgets had been made when it began,
  // and its list is not kept when the patient's last forget came after that (their number here).
  // Bounded as the entries are; a patient whose forget was evicted is taken to have the latest
  // evicted one (evicted in the order they were made, so none was later): on the safe side.
  let forgets = 0
  let evictedUpTo = 0
  const forgottenAt = new Map<string, number>()

  /** Sets `key`'s entry in `map`, the least recently stored first to go (a Map iterates in insertion order). */
  function store<T> (map: Map<string, T>, key: string, entry: T, evicted?: (entry: T) => void): void {
    map.delete(key)
    if (map.size >= maxEntries) {
      const [oldest, value] = map.entries().next().value as [string, T]
      map.delete(oldest)
      evicted?.(value)
    }
    map.set(key, entry)
  }

  function live<T> (entry: { at: number } & T | undefined): T | null {
    return entry !== undefined && now() - entry.at < ttlMs ? entry : null
  }

  /** Keeps a list fetched after `forgetsBefore` forgets had been made. */
  function remember (email: string, appointments: Appointment[], forgetsBefore: number): void {
    const key = email.toLowerCase()
    if ((forgottenAt.get(key) ?? evictedUpTo) > forgetsBefore) return
    const cancelled = live(gone.get(key))
    store(entries, key, { at: now(), appointments: cancelled === null ? appointments : appointments.filter((item) => !cancelled.ids.has(item.id)) })
  }

  async function fresh (email: string, requestId: string): Promise<Appointment[]> {
    const forgetsBefore = forgets
    const appointments = await options.fetch(email, requestId)
    remember(email, appointments, forgetsBefore)
    return appointments
  }

  function cached (email: string): Appointment[] | null {
    return live(entries.get(email.toLowerCase()))?.appointments ?? null
  }

  return {
    list: fresh,
    async find (email, appointmentId, requestId) {
      const fromCache = cached(email)
      const hit = fromCache === null ? null : findAppointment(fromCache, appointmentId)
      // One that ended since the list was fetched is no longer upcoming: asked again (the
      // upstream no longer lists it) rather than sent a cancel it would refuse.
      if (hit !== null && !hasEnded(hit, now())) return hit
      return findAppointment(await fresh(email, requestId), appointmentId)
    },
    async findFresh (email, appointmentId, requestId) {
      return findAppointment(await fresh(email, requestId), appointmentId)
    },
    cancelled (email, appointment) {
      const key = email.toLowerCase()
      const entry = entries.get(key)
      // By id: the entry may hold another copy of it, stored by a list fetched meanwhile.
      if (entry !== undefined) entry.appointments = entry.appointments.filter((item) => item.id !== appointment.id)
      const ids = live(gone.get(key))?.ids ?? new Set<string>()
      store(gone, key, { at: now(), ids: ids.add(appointment.id) })
    },
    forget (email) {
      const key = email.toLowerCase()
      entries.delete(key)
      forgets += 1
      store(forgottenAt, key, forgets, (made) => { evictedUpTo = made })
    }
  }
}
