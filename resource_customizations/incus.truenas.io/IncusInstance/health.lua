-- Argo CD health for incus.truenas.io/IncusInstance (truenas-incus-operator).
-- Degraded: Synced=False (TrueNAS refused the spec, unreachable, not ours, ...), TrueNAS
--           reports the instance in ERROR, or phase Unknown (the instance is not observed: the
--           status shows the last observation, which nobody can vouch for).
-- Progressing: no status yet, the operator has not acted on the latest spec, creating, starting,
--              stopping, stopped or frozen when it should run.
-- Suspended: the resource is paused (incus.truenas.io/paused: Paused=True; the message says what a
--            reconcile would do), or spec.powerState is Stopped and the instance is stopped.
-- Healthy: Ready=True; with spec.managementPolicy ObserveOnly, the instance is observed (the
--          message adds what Full would change, from InSync). ObserveOnly on an instance that
--          does not exist is Degraded (the operator never creates it).
-- Argo CD never runs this for an object being deleted (deletionTimestamp set): it shows
-- Progressing "Pending deletion" itself, so there is no deletion branch here; a stuck deletion
-- shows in status (phase Deleting, Synced=False DeleteFailed) and in the object's Events.
local hs = {status = "Progressing", message = "Waiting for the operator"}
local status = obj.status
if status == nil then
  return hs
end
local ready, synced, paused, insync
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then ready = condition end
    if condition.type == "Synced" then synced = condition end
    if condition.type == "Paused" then paused = condition end
    if condition.type == "InSync" then insync = condition end
  end
end
if paused ~= nil and paused.status == "True" then
  hs.status = "Suspended"
  local why = paused.message or ""
  if synced ~= nil and synced.reason == "ReconciliationPaused" and synced.message ~= nil then
    why = synced.message
  end
  hs.message = "ReconciliationPaused: " .. why
  return hs
end
if synced ~= nil and synced.status == "False" then
  hs.status = "Degraded"
  hs.message = (synced.reason or "NotSynced") .. ": " .. (synced.message or "")
  return hs
end
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.message = "Waiting for the operator to apply generation " .. generation
  return hs
end
local detail = ""
if ready ~= nil and ready.message ~= nil then
  detail = ": " .. ready.message
end
if status.phase == "Error" or status.phase == "Unknown" then
  hs.status = "Degraded"
  hs.message = status.phase .. detail
  return hs
end
if obj.spec ~= nil and obj.spec.managementPolicy == "ObserveOnly" and ready ~= nil then
  if ready.status == "True" then
    hs.status = "Healthy"
    hs.message = ready.message or "Observed"
    if insync ~= nil and insync.status == "False" and insync.message ~= nil then
      hs.message = hs.message .. "; " .. insync.message
    end
    return hs
  end
  if ready.reason == "NotFound" then
    hs.status = "Degraded"
    hs.message = "NotFound: " .. (ready.message or "") .. " (ObserveOnly never creates it)"
    return hs
  end
end
if obj.spec ~= nil and obj.spec.powerState == "Stopped" and status.phase == "Stopped" then
  hs.status = "Suspended"
  hs.message = "Stopped, as spec.powerState asks"
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end
hs.message = (status.phase or "Pending") .. detail
return hs
