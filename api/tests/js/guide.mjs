// The integration guide's JavaScript (Steps 1-3, the complete flow and the
// error handler), copied unchanged between the COPY markers, run under node
// against a live penora-api. Outside the markers: only a base URL for fetch
// and the app-side helpers the guide leaves to ImageGene.
//
// Environment: PENORA_BASE_URL, PENORA_API_KEY, TEST_USER_ID, POOR_USER_ID,
// TEST_IMAGE_BASE64. Prints one JSON object with what happened.

const BASE_URL = process.env.PENORA_BASE_URL;
const realFetch = globalThis.fetch;
globalThis.fetch = (url, init) => realFetch(new URL(url, BASE_URL), init);

const events = [];
function getCurrentUserId() { return process.env.TEST_USER_ID; }
function getCurrentImageSettings() { return '1024x1024 artwork'; }
function calculateCreditCost(settings) {
  return settings.width >= 1024 || settings.height >= 1024 ? 5 : 2;
}
async function generateImageWithAI(prompt, settings) { return process.env.TEST_IMAGE_BASE64; }
function updateUICredits(balance) { events.push({ ui_credits: balance }); }
function showError(message) { events.push({ error: message }); }
function showSuccess(message) { events.push({ success: message }); }
function redirectToPricing() { events.push({ redirect: 'pricing' }); }
console.error = (...args) => events.push({ console_error: args.map(String).join(' ') });

// ---- COPY: Step 1 ----
// Check if user has enough credits
async function checkUserCredits(userId) {
  const response = await fetch(`/api/unified/user-info?user_id=${userId}`, {
    headers: {
      'X-API-Key': process.env.PENORA_API_KEY
    }
  });
  
  const data = await response.json();
  if (data.success) {
    return data.credits;
  }
  throw new Error('Failed to check credits');
}

// Example usage (the guide runs this at top level; a module needs a function for its `return`)
async function exampleUsage() {
const userId = getCurrentUserId();
const credits = await checkUserCredits(userId);
if (credits < 5) {
  showError('Insufficient credits. Please purchase more Ku coins.');
  return;
}
return credits;
}
// ---- END COPY ----

// ---- COPY: Step 2 ----
// Deduct credits when starting generation
async function deductCreditsForImage(userId, creditCost, projectCode) {
  const response = await fetch('/api/unified/deduct-credits', {
    method: 'POST',
    headers: {
      'X-API-Key': process.env.PENORA_API_KEY,
      'Content-Type': 'application/json'
    },
    body: JSON.stringify({
      user_id: userId,
      amount: creditCost,
      app_name: 'imagegene',
      description: `Image generation - ${getCurrentImageSettings()}`,
      project_code: projectCode
    })
  });
  
  const result = await response.json();
  if (result.success) {
    updateUICredits(result.new_balance);
    return result.new_balance;
  }
  throw new Error('Credit deduction failed');
}
// ---- END COPY ----

// ---- COPY: Step 3 ----
// Save generated image to unified workspace
async function saveImageToWorkspace(userId, imageData, metadata) {
  const response = await fetch('/api/unified/save-project', {
    method: 'POST',
    headers: {
      'X-API-Key': process.env.PENORA_API_KEY,
      'Content-Type': 'application/json'
    },
    body: JSON.stringify({
      user_id: userId,
      app_source: 'imagegene',
      project_type: 'ai_artwork',
      title: metadata.title || `AI Artwork ${Date.now()}`,
      content: imageData, // base64 or URL
      metadata: {
        style: metadata.style,
        dimensions: metadata.dimensions,
        model: metadata.model,
        prompt: metadata.prompt,
        generation_time: metadata.generationTime
      }
    })
  });
  
  return await response.json();
}
// ---- END COPY ----

// ---- COPY: Complete Integration Flow ----
// Complete ImageGene generation with Penora integration
async function generateImageWithPenoraSync(userId, prompt, settings) {
  try {
    // 1. Check credits
    const currentCredits = await checkUserCredits(userId);
    const requiredCredits = calculateCreditCost(settings);
    
    if (currentCredits < requiredCredits) {
      throw new Error('Insufficient credits');
    }
    
    // 2. Generate unique project code
    const projectCode = `img_${Date.now()}_${Math.random().toString(36).substr(2, 9)}`;
    
    // 3. Deduct credits before generation
    const newBalance = await deductCreditsForImage(userId, requiredCredits, projectCode);
    
    // 4. Generate image (your existing logic)
    const imageData = await generateImageWithAI(prompt, settings);
    
    // 5. Save to unified workspace
    await saveImageToWorkspace(userId, imageData, {
      title: `AI Art: ${prompt.substring(0, 50)}...`,
      style: settings.style,
      dimensions: `${settings.width}x${settings.height}`,
      model: settings.model,
      prompt: prompt,
      generationTime: new Date().toISOString()
    });
    
    // 6. Update UI
    updateUICredits(newBalance);
    showSuccess(`Image generated! ${newBalance} credits remaining.`);
    
    return {
      success: true,
      imageData,
      projectCode,
      creditsRemaining: newBalance
    };
    
  } catch (error) {
    console.error('Generation failed:', error);
    
    // Optionally refund credits on failure
    // await refundCredits(userId, requiredCredits, projectCode);
    
    throw error;
  }
}
// ---- END COPY ----

// ---- COPY: Recommended Error Handling ----
async function handleAPICall(apiFunction) {
  try {
    return await apiFunction();
  } catch (error) {
    if (error.message.includes('API key')) {
      console.error('Penora API authentication failed');
      showError('Connection to credit system failed. Please try again.');
    } else if (error.message.includes('Insufficient')) {
      showError('Not enough Ku coins. Please purchase more credits.');
      redirectToPricing();
    } else {
      console.error('Penora API error:', error);
      showError('Credit system temporarily unavailable. Please try again.');
    }
    throw error;
  }
}
// ---- END COPY ----

const settings = { width: 1024, height: 1024, style: 'realistic', model: 'stable_diffusion_xl' };
const out = {};
out.example_credits = await exampleUsage();
const result = await handleAPICall(() =>
  generateImageWithPenoraSync(getCurrentUserId(), 'Beautiful sunset over mountains', settings));
out.flow = { success: result.success, projectCode: result.projectCode, creditsRemaining: result.creditsRemaining };
try {
  await handleAPICall(() => generateImageWithPenoraSync(process.env.POOR_USER_ID, 'A cat', settings));
  out.poor = 'no error';
} catch (error) {
  out.poor = error.message;
}
process.env.PENORA_API_KEY = 'not-a-key';
try {
  await checkUserCredits(getCurrentUserId());
  out.bad_key = 'no error';
} catch (error) {
  out.bad_key = error.message;
}
out.events = events;
console.log(JSON.stringify(out));
