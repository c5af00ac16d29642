-- Argo CD health for incus.truenas.io/IncusInstance (truenas-incus-operator).
-- Degraded: Synced=False (TrueNAS refused, unreachable, not ours, delete failed, ...).
-- Progressing: no status yet, the operator has not acted on the latest spec, creating, starting,
--              stopping, deleting.
-- Suspended: spec.powerState is Stopped and the instance is stopped.
-- Healthy: Ready=True.
local hs = {status = "Progressing", message = "Waiting for the operator"}
local status = obj.status
local deleting = obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil
if status == nil then
  if deleting then hs.message = "Deleting" end
  return hs
end
local ready, synced
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then ready = condition end
    if condition.type == "Synced" then synced = condition end
  end
end
if synced ~= nil and synced.status == "False" then
  hs.status = "Degraded"
  hs.message = (synced.reason or "NotSynced") .. ": " .. (synced.message or "")
  return hs
end
if deleting then
  hs.message = "Deleting the instance on TrueNAS"
  return hs
end
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.message = "Waiting for the operator to apply generation " .. generation
  return hs
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
hs.message = status.phase or "Pending"
if ready ~= nil and ready.message ~= nil then
  hs.message = hs.message .. ": " .. ready.message
end
return hs
